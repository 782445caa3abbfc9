import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import type * as net from 'node:net';
import { pino } from 'pino';
import { ErrorCodes, type TmError } from '../../src/errors.js';
import { frameTag, proofPrimary, sessionKey } from '../../src/wire/auth.js';
import { decode, encode } from '../../src/wire/codec.js';
import { primaryHandshake, secondaryHandshake } from '../../src/wire/handshake.js';
import { MAX_HANDSHAKE_FRAME_BYTES, PROTOCOL_VERSION } from '../../src/wire/messages.js';
import { crc32c } from '../../src/wire/payload.js';
import { CLOSE_GRACE_MS, type Session } from '../../src/wire/session.js';
import { connect, listen, type Listener } from '../../src/wire/transport.js';
import { mapBomb, probe, rawWebSocket } from '../helpers/raw-ws.js';

const KEY = Buffer.from('preauth-test-pre-shared-key-0123456789ab');
const MiB = 1024 * 1024;

/** A loopback listener whose sessions run the secondary's handshake (and answer ready), with its warnings captured. */
async function secondary(limits?: { total: number; perAddress: number }): Promise<{ listener: Listener; port: number; sessions: Session[]; outcomes: Promise<TmError | null>[]; warnings: Record<string, unknown>[] }> {
  const warnings: Record<string, unknown>[] = [];
  const log = pino({ level: 'warn' }, { write: (line: string) => void warnings.push(JSON.parse(line) as Record<string, unknown>) });
  const sessions: Session[] = [];
  const outcomes: Promise<TmError | null>[] = [];
  const listener = await listen({
    host: '127.0.0.1',
    port: 0,
    tls: null,
    log,
    ...(limits ? { limits } : {}),
    onSession: (s) => {
      sessions.push(s);
      outcomes.push(
        secondaryHandshake(s, { node: 'site-b', psk: KEY }).then(
          ({ auth }) => {
            s.ctx.volumeSize = auth.volumeSize;
            s.ctx.chunkSize = auth.chunkSize;
            s.send({ type: 'ready', committedGeneration: 0, applying: null });
            return null;
          },
          (e: TmError) => e,
        ),
      );
    },
  });
  return { listener, port: listener.address.port, sessions, outcomes, warnings };
}

async function primary(port: number): Promise<Session> {
  const s = await connect(`ws://127.0.0.1:${port}`, { tls: null, signal: new AbortController().signal });
  await primaryHandshake(s, { node: 'site-a', mirror: 'vm1', psk: KEY, volumeSize: 64 * MiB, chunkSize: 4096, volumeId: 'ab12' });
  return s;
}

/** Resolves 'closed' when `closed` settles within `ms`, else 'open'. */
function within(closed: Promise<unknown>, ms: number): Promise<'closed' | 'open'> {
  return Promise.race([closed.then(() => 'closed' as const), new Promise<'open'>((r) => setTimeout(() => r('open'), ms))]);
}

describe('before authentication (issue 14 §1): the WebSocket listener', function () {
  this.timeout(30_000);
  let s: Awaited<ReturnType<typeof secondary>> | null = null;
  const sockets: net.Socket[] = [];
  afterEach(async () => {
    for (const k of sockets.splice(0)) k.destroy();
    await s?.listener.close();
    s = null;
  });

  it('an 8 MiB frame of millions of empty maps is refused from its header with TM_ERR_PREAUTH_LIMIT, and the socket closed within the grace period', async () => {
    s = await secondary();
    const raw = await rawWebSocket(s.port);
    sockets.push(raw.socket);
    raw.send(mapBomb());
    const err = await s.outcomes[0]!;
    expect(err?.code).to.equal(ErrorCodes.PREAUTH_LIMIT);
    expect(err?.message).to.contain(`the ${MAX_HANDSHAKE_FRAME_BYTES} bytes allowed before it has proven the key`);
    expect(await within(raw.closed, CLOSE_GRACE_MS + 3000), 'the attacker still holds a socket').to.equal('closed');
  });

  it('a frame one byte over the handshake limit is refused the same way; one at the limit is decoded (and fails as a protocol violation)', async () => {
    s = await secondary();
    const over = await rawWebSocket(s.port);
    sockets.push(over.socket);
    over.send(Buffer.alloc(MAX_HANDSHAKE_FRAME_BYTES + 1, 0xc1));
    expect((await s.outcomes[0]!)?.code).to.equal(ErrorCodes.PREAUTH_LIMIT);
    const at = await rawWebSocket(s.port);
    sockets.push(at.socket);
    at.send(Buffer.alloc(MAX_HANDSHAKE_FRAME_BYTES, 0xc1));
    expect((await s.outcomes[1]!)?.code).to.equal(ErrorCodes.PROTOCOL);
  });

  for (const when of ['before', 'after'] as const) {
    it(`regression: a peer that sends an error frame ${when} authentication and never closes loses its socket within the grace period`, async () => {
      s = await secondary();
      let closed: Promise<unknown>;
      if (when === 'before') {
        const raw = await rawWebSocket(s.port);
        sockets.push(raw.socket);
        raw.send(encode({ type: 'error', code: ErrorCodes.AUTH_FAILED, message: 'go away' }));
        closed = raw.closed;
      } else {
        // The primary's half by hand, then an error frame with a valid MAC, and silence.
        const raw = await rawWebSocket(s.port);
        sockets.push(raw.socket);
        const nonceP = randomBytes(32);
        raw.send(encode({ type: 'hello', version: PROTOCOL_VERSION, node: 'site-a', mirror: 'vm1', nonce: nonceP }));
        const challenge = decode(await raw.nextFrame(), {});
        if (challenge.type !== 'challenge') expect.fail(`expected a challenge, got ${challenge.type}`);
        const t = { mirror: 'vm1', primaryNode: 'site-a', secondaryNode: challenge.node, nonceP, nonceS: challenge.nonce };
        const vol = { volumeSize: 64 * MiB, chunkSize: 4096, volumeId: 'ab12' };
        raw.send(encode({ type: 'auth', proof: proofPrimary(KEY, t, vol), ...vol }));
        expect(await s.outcomes[0]!, 'authenticated').to.equal(null);
        const key = sessionKey(KEY, 'vm1', nonceP, challenge.nonce);
        const body = encode({ type: 'error', code: ErrorCodes.PEER, message: 'bye, but I stay' });
        raw.send(Buffer.concat([body, frameTag(key, 'primary', 0, body)]));
        closed = raw.closed;
      }
      const err = await s.sessions[0]!.closed;
      expect(err?.code).to.equal(when === 'before' ? ErrorCodes.AUTH_FAILED : ErrorCodes.PEER);
      expect(await within(closed, CLOSE_GRACE_MS + 3000), 'the peer still holds a socket').to.equal('closed');
    });
  }

  it('after authentication the limit is lifted: a 4 MiB data extent passes one way, 256 KiB of digests the other', async () => {
    s = await secondary();
    const p = await primary(s.port);
    expect(await s.outcomes[0]!).to.equal(null);
    const payload = randomBytes(4 * MiB);
    p.send({ type: 'extent', seq: 1, kind: 'data', offset: 0, length: payload.length, codec: 'raw', crc32c: crc32c(payload), payload });
    const m = await s.sessions[0]!.next(5000);
    if (m.type !== 'extent') expect.fail(`expected an extent, got ${m.type}`);
    expect(m.payload!.equals(payload)).to.equal(true);
    // 64 MiB of 4 KiB chunks: 16384 digests of 16 bytes.
    const digests = randomBytes(16 * 16384);
    s.sessions[0]!.send({ type: 'digests', offset: 0, length: 64 * MiB, digests });
    const d = await p.next(5000);
    if (d.type !== 'digests') expect.fail(`expected digests, got ${d.type}`);
    expect(d.digests.equals(digests)).to.equal(true);
    p.close();
  });

  it('bounds unauthenticated connections per address and in total; refusals are logged with TM_ERR_PREAUTH_LIMIT; a closed connection frees its place', async () => {
    s = await secondary({ total: 4, perAddress: 2 });
    const keep = async (addr: string) => {
      const r = await probe(s!.port, addr);
      sockets.push(r.socket);
      return r.result;
    };
    expect(await keep('127.0.0.1')).to.equal('served');
    expect(await keep('127.0.0.1')).to.equal('served');
    expect(await keep('127.0.0.1'), 'third from one address').to.equal('refused');
    expect(await keep('127.0.0.2')).to.equal('served');
    expect(await keep('127.0.0.3')).to.equal('served');
    expect(await keep('127.0.0.4'), 'fifth in total').to.equal('refused');
    const w = s.warnings.find((l) => l.code === ErrorCodes.PREAUTH_LIMIT);
    expect(w?.msg).to.match(/connection from 127\.0\.0\.1 refused: 2 unauthenticated connections from 127\.0\.0\.1 \(at most 2\)/);
    // A closed connection frees its place.
    sockets.shift()!.destroy();
    await new Promise((r) => setTimeout(r, 100));
    expect(await keep('127.0.0.1'), 'after one closed').to.equal('served');
  });

  it('an authenticated session no longer counts against the bounds', async () => {
    s = await secondary({ total: 64, perAddress: 2 });
    const p = await primary(s.port); // from 127.0.0.1
    expect(await s.outcomes[0]!).to.equal(null);
    const keep = async () => {
      const r = await probe(s!.port, '127.0.0.1');
      sockets.push(r.socket);
      return r.result;
    };
    expect(await keep()).to.equal('served');
    expect(await keep(), 'second unauthenticated beside an authenticated session').to.equal('served');
    expect(await keep()).to.equal('refused');
    expect(p.isOpen).to.equal(true);
    p.close();
  });
});
