import { expect } from 'chai';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import * as https from 'node:https';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { WebSocket, WebSocketServer } from 'ws';
import { BufferRing } from '../../src/util/buffer-ring.js';
import { readDirect } from '../../src/wire/transport.js';
import { makeTestPki } from '../helpers/certs.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/**
 * readDirect (wire/transport.ts) on the accepting side of a real ws
 * connection, fed by an ordinary ws client: its frames carry random masks
 * (ours carry the zero mask), so unmasking is exercised too. What it
 * relies on in Node (a net.Socket's kBuffer, kBufferCb and kBufferGen, the
 * handle's useUserBuffer) and in ws 8.x (Receiver._state, _bufferedBytes,
 * _fragmented, _maxPayload, write) is pinned here: readDirect returning
 * false fails these tests.
 */
async function pair(o: { tls?: { key: Buffer; cert: Buffer; ca: Buffer } } = {}): Promise<{ server: WebSocket; client: WebSocket; close: () => Promise<void> }> {
  const httpsServer = o.tls ? https.createServer({ key: o.tls.key, cert: o.tls.cert }) : null;
  const wss = httpsServer ? new WebSocketServer({ server: httpsServer, perMessageDeflate: false }) : new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false });
  if (httpsServer) httpsServer.listen(0, '127.0.0.1');
  await once(httpsServer ?? wss, 'listening');
  const port = ((httpsServer ?? wss).address() as AddressInfo).port;
  const accepted = once(wss, 'connection');
  const client = new WebSocket(`${o.tls ? 'wss' : 'ws'}://${o.tls ? 'localhost' : '127.0.0.1'}:${port}`, { perMessageDeflate: false, ...(o.tls ? { ca: o.tls.ca } : {}) });
  await once(client, 'open');
  const [server] = (await accepted) as [WebSocket];
  return {
    server,
    client,
    close: async () => {
      client.terminate();
      server.terminate();
      await new Promise((r) => wss.close(r));
      if (httpsServer) await new Promise((r) => httpsServer.close(r));
    },
  };
}

/** Frames delivered by readDirect, and those ws emitted itself (passthrough), in arrival order. */
function collect(server: WebSocket, ring: BufferRing): { got: { how: 'direct' | 'ws'; data: Buffer; binary: boolean; inRing?: boolean }[]; wait: (n: number) => Promise<void>; switched: boolean } {
  const got: { how: 'direct' | 'ws'; data: Buffer; binary: boolean; inRing?: boolean }[] = [];
  let waiter: (() => void) | null = null;
  let want = 0;
  const note = () => {
    if (waiter && got.length >= want) waiter();
  };
  server.on('message', (data: Buffer, binary: boolean) => {
    got.push({ how: 'ws', data: Buffer.from(data), binary });
    note();
  });
  const switched = readDirect(server, ring, (frame) => {
    got.push({ how: 'direct', data: Buffer.from(frame), binary: true, inRing: ring.owns(frame) });
    ring.release(frame);
    note();
  });
  return {
    got,
    switched,
    wait: (n) =>
      new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`${got.length} of ${n} frames arrived`)), 10_000);
        want = n;
        waiter = () => {
          clearTimeout(t);
          waiter = null;
          resolve();
        };
        note();
      }),
  };
}

describe('readDirect: the socket read into our own buffers after authentication (Node user-buffer reads, ws 8.x Receiver pinned)', () => {
  let dir: string;
  before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-readdirect-'))));
  after(() => rmSync(dir, { recursive: true, force: true }));

  for (const tls of [false, true]) {
    it(`binary frames of every size arrive whole, in order, unmasked, large ones in the ring; ping is answered; close works (${tls ? 'TLS' : 'plain TCP'})`, async () => {
      let material: { key: Buffer; cert: Buffer; ca: Buffer } | undefined;
      if (tls) {
        const pki = makeTestPki(dir); // fails (never skips) without the openssl CLI
        material = { key: readFileSync(pki.server.key), cert: readFileSync(pki.server.cert), ca: readFileSync(pki.ca.cert) };
      }
      const p = await pair(material ? { tls: material } : {});
      try {
        const ring = new BufferRing(8 * MiB);
        const c = collect(p.server, ring);
        expect(c.switched, 'readDirect switched the socket over').to.equal(true);
        const sizes = [1, 125, 126, 4 * KiB, 4 * KiB + 1, 65535, 65536, 100 * KiB, MiB + 3, 10, 3 * MiB, 0, 7];
        const sent = sizes.map((n) => randomBytes(n));
        const pong = once(p.client, 'pong');
        for (const [i, b] of sent.entries()) {
          p.client.send(b, { binary: true });
          if (i === 4) p.client.ping(Buffer.from('are you there'));
        }
        await c.wait(sent.length);
        expect((await pong)[0].toString()).to.equal('are you there');
        expect(c.got.map((g) => g.how)).to.deep.equal(sent.map(() => 'direct'));
        for (const [i, b] of sent.entries()) expect(c.got[i]!.data.equals(b), `frame ${i} (${b.length} bytes)`).to.equal(true);
        expect(c.got.map((g) => g.inRing)).to.deep.equal(sizes.map((n) => n > 4 * KiB));
        // The server's own sends are untouched, and its close reaches the client.
        const closed = once(p.client, 'close');
        p.server.close(4000, 'done');
        const [code, reason] = (await closed) as [number, Buffer];
        expect([code, reason.toString()]).to.deep.equal([4000, 'done']);
      } finally {
        await p.close();
      }
    });
  }

  it('a text frame, a fragmented message or an oversized frame is handed to ws with the rest of the stream', async () => {
    const p = await pair();
    try {
      const ring = new BufferRing(4 * MiB);
      const c = collect(p.server, ring);
      expect(c.switched).to.equal(true);
      const a = randomBytes(200 * KiB);
      p.client.send(a, { binary: true });
      p.client.send('some text');
      const b = randomBytes(300 * KiB);
      p.client.send(b, { binary: true });
      await c.wait(3);
      expect(c.got.map((g) => [g.how, g.binary])).to.deep.equal([
        ['direct', true],
        ['ws', false],
        ['ws', true],
      ]);
      expect(c.got[0]!.data.equals(a) && c.got[2]!.data.equals(b)).to.equal(true);
    } finally {
      await p.close();
    }

    const q = await pair();
    try {
      const c = collect(q.server, new BufferRing(MiB));
      const x = randomBytes(10 * KiB);
      const y = randomBytes(20 * KiB);
      q.client.send(x.subarray(0, 5000), { binary: true, fin: false });
      q.client.send(x.subarray(5000), { binary: true, fin: true });
      q.client.send(y, { binary: true });
      await c.wait(2);
      expect(c.got.map((g) => g.how)).to.deep.equal(['ws', 'ws']);
      expect(c.got[0]!.data.equals(x) && c.got[1]!.data.equals(y)).to.equal(true);
    } finally {
      await q.close();
    }

    const r = await pair();
    try {
      (r.server as unknown as { _receiver: { _maxPayload: number } })._receiver._maxPayload = 64 * KiB;
      const c = collect(r.server, new BufferRing(MiB));
      const error = once(r.server, 'error');
      const closed = once(r.client, 'close');
      r.client.send(randomBytes(100 * KiB), { binary: true });
      const [err] = (await error) as [Error & { code?: string }];
      expect(err.code).to.equal('WS_ERR_UNSUPPORTED_MESSAGE_LENGTH');
      const [code] = (await closed) as [number];
      expect(code, 'ws refuses the frame as too large').to.equal(1009);
      expect(c.got).to.deep.equal([]);
    } finally {
      await r.close();
    }
  });

  it('is refused (false, nothing changed) once switched, on a paused socket, or with bytes waiting in ws', async () => {
    const p = await pair();
    try {
      expect(readDirect(p.server, new BufferRing(MiB), () => {})).to.equal(true);
      expect(readDirect(p.server, new BufferRing(MiB), () => {}), 'already switched').to.equal(false);
    } finally {
      await p.close();
    }
    const q = await pair();
    try {
      q.server.pause();
      expect(readDirect(q.server, new BufferRing(MiB), () => {})).to.equal(false);
      q.server.resume();
      const receiver = (q.server as unknown as { _receiver: { _bufferedBytes: number } })._receiver;
      receiver._bufferedBytes = 3;
      expect(readDirect(q.server, new BufferRing(MiB), () => {})).to.equal(false);
      receiver._bufferedBytes = 0;
      // Still a plain ws connection: messages arrive as ws's.
      const got = once(q.server, 'message');
      q.client.send(Buffer.from('still ws'));
      expect(((await got)[0] as Buffer).toString()).to.equal('still ws');
    } finally {
      await q.close();
    }
  });
});
