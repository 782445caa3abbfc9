import { ErrorCodes, TmError } from '../errors.js';
import { newNonce, proofPrimary, proofSecondary, verifyProof } from './auth.js';
import { CloseCodes, PROTOCOL_VERSION, type AuthMsg, type HelloMsg, type Message, type ReadyMsg } from './messages.js';
import type { Session } from './session.js';

/** How long either side waits for the next handshake frame. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;

function expectType<T extends Message['type']>(session: Session, msg: Message, type: T): Extract<Message, { type: T }> {
  if (msg.type !== type) {
    const err = new TmError(ErrorCodes.PROTOCOL, `expected a ${type} frame from ${session.peerName}, got ${msg.type}`);
    session.fail(err);
    throw err;
  }
  return msg as Extract<Message, { type: T }>;
}

export interface PrimaryHandshakeParams {
  node: string;
  mirror: string;
  psk: Buffer;
  volumeSize: number;
  chunkSize: number;
  volumeId: string;
  /** The primary has no tracking state for this mirror (see AuthMsg.fresh). */
  fresh?: boolean;
}

/**
 * The primary's half: hello -> (challenge) -> auth -> (ready). The volume's
 * identity is sent only after the secondary has proven the key. Returns the
 * secondary's node name and its ready frame; throws the coded error otherwise
 * (also when the secondary refuses: its code is kept).
 */
export async function primaryHandshake(session: Session, p: PrimaryHandshakeParams): Promise<{ peerNode: string; ready: ReadyMsg }> {
  const nonceP = newNonce();
  session.send({ type: 'hello', version: PROTOCOL_VERSION, node: p.node, mirror: p.mirror, nonce: nonceP });
  const challenge = expectType(session, await session.next(HANDSHAKE_TIMEOUT_MS), 'challenge');
  if (challenge.version !== PROTOCOL_VERSION) {
    const err = new TmError(ErrorCodes.VERSION_MISMATCH, `${session.peerName} speaks protocol version ${challenge.version}, this node speaks ${PROTOCOL_VERSION}`);
    session.fail(err, CloseCodes.REFUSED);
    throw err;
  }
  if (!verifyProof(proofSecondary(p.psk, p.mirror, nonceP, challenge.nonce), challenge.proof)) {
    const err = new TmError(ErrorCodes.AUTH_FAILED, `${session.peerName} (node ${challenge.node}) could not prove the pre-shared key: the keys differ`);
    session.fail(err, CloseCodes.REFUSED);
    throw err;
  }
  session.send({
    type: 'auth',
    proof: proofPrimary(p.psk, p.mirror, nonceP, challenge.nonce),
    volumeSize: p.volumeSize,
    chunkSize: p.chunkSize,
    volumeId: p.volumeId,
    ...(p.fresh ? { fresh: true } : {}),
  });
  session.ctx.volumeSize = p.volumeSize;
  session.ctx.chunkSize = p.chunkSize;
  const ready = expectType(session, await session.next(HANDSHAKE_TIMEOUT_MS), 'ready');
  return { peerNode: challenge.node, ready };
}

/**
 * The secondary's half up to authentication: (hello) -> challenge -> (auth).
 * The caller then checks the mirror name and the volume identity and either
 * sends `ready` or refuses with {@link refuse}.
 */
export async function secondaryHandshake(session: Session, p: { node: string; psk: Buffer }): Promise<{ hello: HelloMsg; auth: AuthMsg }> {
  const hello = expectType(session, await session.next(HANDSHAKE_TIMEOUT_MS), 'hello');
  if (hello.version !== PROTOCOL_VERSION) {
    throw refuse(session, new TmError(ErrorCodes.VERSION_MISMATCH, `primary ${hello.node} speaks protocol version ${hello.version}, this node speaks ${PROTOCOL_VERSION}`));
  }
  const nonceS = newNonce();
  session.send({
    type: 'challenge',
    version: PROTOCOL_VERSION,
    node: p.node,
    nonce: nonceS,
    proof: proofSecondary(p.psk, hello.mirror, hello.nonce, nonceS),
  });
  const auth = expectType(session, await session.next(HANDSHAKE_TIMEOUT_MS), 'auth');
  if (!verifyProof(proofPrimary(p.psk, hello.mirror, hello.nonce, nonceS), auth.proof)) {
    throw refuse(session, new TmError(ErrorCodes.AUTH_FAILED, `primary ${hello.node} could not prove the pre-shared key for mirror ${hello.mirror}: the keys differ`));
  }
  return { hello, auth };
}

/** Refuse the session with a coded error (sent to the peer); returns the error to throw. */
export function refuse(session: Session, err: TmError): TmError {
  session.fail(err, CloseCodes.REFUSED);
  return err;
}
