import { ErrorCodes, TmError } from '../errors.js';
import { newNonce, proofPrimary, proofSecondary, sessionKey, verifyProof, type Transcript } from './auth.js';
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
 * identity is sent only after the secondary has proven the key. Every frame
 * after auth, either way (ready first), carries a MAC (Session.protect).
 * Returns the secondary's node name and its ready frame; throws the coded
 * error otherwise (also when the secondary refuses: its code is kept).
 */
export async function primaryHandshake(session: Session, p: PrimaryHandshakeParams): Promise<{ peerNode: string; ready: ReadyMsg }> {
  // The challenge is the one frame the secondary sends without a MAC.
  session.beginHandshake(1);
  const nonceP = newNonce();
  session.send({ type: 'hello', version: PROTOCOL_VERSION, node: p.node, mirror: p.mirror, nonce: nonceP });
  const challenge = expectType(session, await session.next(HANDSHAKE_TIMEOUT_MS), 'challenge');
  if (challenge.version !== PROTOCOL_VERSION) {
    const err = new TmError(ErrorCodes.VERSION_MISMATCH, `${session.peerName} speaks protocol version ${challenge.version}, this node speaks ${PROTOCOL_VERSION}`);
    session.fail(err, CloseCodes.REFUSED);
    throw err;
  }
  const t: Transcript = { mirror: p.mirror, primaryNode: p.node, secondaryNode: challenge.node, nonceP, nonceS: challenge.nonce };
  if (!verifyProof(proofSecondary(p.psk, t), challenge.proof)) {
    const err = new TmError(ErrorCodes.AUTH_FAILED, `${session.peerName} (node ${challenge.node}) could not prove the pre-shared key: the keys differ`);
    session.fail(err, CloseCodes.REFUSED);
    throw err;
  }
  const volume = { volumeSize: p.volumeSize, chunkSize: p.chunkSize, volumeId: p.volumeId, ...(p.fresh ? { fresh: true } : {}) };
  session.send({ type: 'auth', proof: proofPrimary(p.psk, t, volume), ...volume });
  session.protect(sessionKey(p.psk, p.mirror, nonceP, challenge.nonce), 'primary');
  session.ctx.volumeSize = p.volumeSize;
  session.ctx.chunkSize = p.chunkSize;
  const ready = expectType(session, await session.next(HANDSHAKE_TIMEOUT_MS), 'ready');
  return { peerNode: challenge.node, ready };
}

/**
 * The secondary's half up to authentication: (hello) -> challenge -> (auth).
 * Once the primary's proof (which covers the volume identity in auth) has
 * verified, the session is protected: the caller then checks the mirror name
 * and the volume identity and either sends `ready` or refuses with
 * {@link refuse}, both with a MAC.
 */
export async function secondaryHandshake(session: Session, p: { node: string; psk: Buffer }): Promise<{ hello: HelloMsg; auth: AuthMsg }> {
  // hello and auth are the two frames the primary sends without a MAC.
  session.beginHandshake(2);
  const hello = expectType(session, await session.next(HANDSHAKE_TIMEOUT_MS), 'hello');
  if (hello.version !== PROTOCOL_VERSION) {
    throw refuse(session, new TmError(ErrorCodes.VERSION_MISMATCH, `primary ${hello.node} speaks protocol version ${hello.version}, this node speaks ${PROTOCOL_VERSION}`));
  }
  const nonceS = newNonce();
  const t: Transcript = { mirror: hello.mirror, primaryNode: hello.node, secondaryNode: p.node, nonceP: hello.nonce, nonceS };
  session.send({ type: 'challenge', version: PROTOCOL_VERSION, node: p.node, nonce: nonceS, proof: proofSecondary(p.psk, t) });
  const auth = expectType(session, await session.next(HANDSHAKE_TIMEOUT_MS), 'auth');
  if (!verifyProof(proofPrimary(p.psk, t, auth), auth.proof)) {
    throw refuse(
      session,
      new TmError(ErrorCodes.AUTH_FAILED, `primary ${hello.node} could not prove the pre-shared key for mirror ${hello.mirror} (or its auth frame was changed on the way): the keys differ`),
    );
  }
  session.protect(sessionKey(p.psk, hello.mirror, hello.nonce, nonceS), 'secondary');
  return { hello, auth };
}

/** Refuse the session with a coded error (sent to the peer); returns the error to throw. */
export function refuse(session: Session, err: TmError): TmError {
  session.fail(err, CloseCodes.REFUSED);
  return err;
}
