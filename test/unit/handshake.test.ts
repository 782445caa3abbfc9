import { expect } from 'chai';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { WebSocket, WebSocketServer } from 'ws';
import { TmError } from '../../src/errors.js';
import { primaryHandshake, secondaryHandshake } from '../../src/wire/handshake.js';
import { Session } from '../../src/wire/session.js';
import { wsChannel } from '../../src/wire/transport.js';
import { PROTOCOL_VERSION } from '../../src/wire/messages.js';

const KEY = Buffer.from('the-shared-key-of-this-test-0001');

/** A real ws server and client on loopback, each side wrapped in a Session. */
async function pair(): Promise<{ client: Session; server: Session; close: () => Promise<void> }> {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(wss, 'listening');
  const port = (wss.address() as AddressInfo).port;
  const serverP = once(wss, 'connection').then(([ws]) => new Session(wsChannel(ws as WebSocket), 'primary test'));
  const ws = new WebSocket(`ws://127.0.0.1:${port}`);
  await once(ws, 'open');
  const server = await serverP;
  const client = new Session(wsChannel(ws), 'secondary test');
  return {
    client,
    server,
    close: async () => {
      client.destroy();
      server.destroy();
      for (const c of wss.clients) c.terminate();
      await new Promise((r) => wss.close(r));
    },
  };
}

const params = { node: 'site-a', mirror: 'vm1', volumeSize: 1 << 20, chunkSize: 65536, volumeId: 'ab12' };

describe('handshake: version, mutual HMAC, coded refusals (real ws on loopback)', () => {
  it('succeeds with the same key and settles the volume on both sides', async () => {
    const p = await pair();
    try {
      const sec = secondaryHandshake(p.server, { node: 'site-b', psk: KEY }).then((r) => {
        p.server.ctx.volumeSize = r.auth.volumeSize;
        p.server.ctx.chunkSize = r.auth.chunkSize;
        p.server.send({ type: 'ready', committedGeneration: 4, applying: { generation: 5, cursor: 65536 } });
        return r;
      });
      const { peerNode, ready } = await primaryHandshake(p.client, { ...params, psk: KEY });
      const r = await sec;
      expect(peerNode).to.equal('site-b');
      expect(ready).to.deep.equal({ type: 'ready', committedGeneration: 4, applying: { generation: 5, cursor: 65536 } });
      expect(r.hello).to.include({ node: 'site-a', mirror: 'vm1' });
      expect(r.auth).to.include({ volumeSize: 1 << 20, chunkSize: 65536, volumeId: 'ab12' });
    } finally {
      await p.close();
    }
  });

  it('a wrong key fails with TM_ERR_AUTH_FAILED on both sides before the volume identity is sent', async () => {
    const p = await pair();
    try {
      const sec = secondaryHandshake(p.server, { node: 'site-b', psk: Buffer.from('another-key-another-key-another') }).catch((e: TmError) => e);
      const pri = await primaryHandshake(p.client, { ...params, psk: KEY }).catch((e: TmError) => e);
      expect(pri).to.be.instanceOf(TmError);
      expect((pri as TmError).code).to.equal('TM_ERR_AUTH_FAILED');
      const s = await sec;
      expect((s as TmError).code).to.equal('TM_ERR_AUTH_FAILED'); // learnt from the primary's error frame
      // The primary refused after the challenge: only the hello went out through send(),
      // no auth frame with the volume identity (the error frame bypasses send()).
      expect(p.client.counters.framesOut).to.equal(1);
    } finally {
      await p.close();
    }
  });

  it('another protocol version (1, with zlib CRC-32 payloads, or a newer one) is refused with TM_ERR_VERSION_MISMATCH', async () => {
    for (const version of [1, PROTOCOL_VERSION + 1]) {
      const p = await pair();
      try {
        const sec = secondaryHandshake(p.server, { node: 'site-b', psk: KEY }).catch((e: TmError) => e);
        p.client.send({ type: 'hello', version, node: 'site-a', mirror: 'vm1', nonce: Buffer.alloc(32, 1) });
        const got = await p.client.next(5000).catch((e: TmError) => e);
        expect((got as TmError).code, `version ${version}`).to.equal('TM_ERR_VERSION_MISMATCH');
        expect(((await sec) as TmError).code, `version ${version}`).to.equal('TM_ERR_VERSION_MISMATCH');
      } finally {
        await p.close();
      }
    }
  });

  it('garbage instead of a hello ends the session with TM_ERR_PROTOCOL', async () => {
    const p = await pair();
    try {
      const sec = secondaryHandshake(p.server, { node: 'site-b', psk: KEY }).catch((e: TmError) => e);
      p.client.channel.send([Buffer.from([0xc1, 0xff, 0x00, 0x13])]);
      const err = (await sec) as TmError;
      expect(err.code).to.equal('TM_ERR_PROTOCOL');
      const seen = await p.client.next(5000).catch((e: TmError) => e);
      expect((seen as TmError).code).to.equal('TM_ERR_PROTOCOL');
    } finally {
      await p.close();
    }
  });

  it('a silent peer times out with TM_ERR_TIMEOUT', async () => {
    const p = await pair();
    try {
      const got = await p.server.next(200).catch((e: TmError) => e);
      expect((got as TmError).code).to.equal('TM_ERR_TIMEOUT');
    } finally {
      await p.close();
    }
  });
});
