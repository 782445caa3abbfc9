import { expect } from 'chai';
import { once } from 'node:events';
import * as http from 'node:http';
import * as net from 'node:net';
import { pino } from 'pino';
import { ErrorCodes } from '../../src/errors.js';
import type { Session } from '../../src/wire/session.js';
import { connect, gatherWriter, listen, type Listener } from '../../src/wire/transport.js';
import { WebSocket, WebSocketServer } from 'ws';
import { randomBytes } from 'node:crypto';
import { crc32c } from '../../src/wire/payload.js';
import type { ExtentMsg } from '../../src/wire/messages.js';
import { rejection } from '../helpers/rejection.js';

const log = pino({ level: 'silent' });

/** A loopback listener; `accepted()` gives its sessions in the order they arrived. */
async function loopback(): Promise<{ listener: Listener; url: string; accepted: () => Promise<Session> }> {
  const waiting: Session[] = [];
  const wanted: ((s: Session) => void)[] = [];
  const listener = await listen({
    host: '127.0.0.1',
    port: 0,
    tls: null,
    log,
    onSession: (s) => {
      const w = wanted.shift();
      if (w) w(s);
      else waiting.push(s);
    },
  });
  const accepted = () => new Promise<Session>((resolve) => (waiting.length > 0 ? resolve(waiting.shift()!) : wanted.push(resolve)));
  return { listener, url: `ws://127.0.0.1:${listener.address.port}`, accepted };
}

/** A port nothing listens on (just closed). */
async function closedPort(): Promise<number> {
  const s = net.createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

describe('transport: the WebSocket listener and client (loopback, no TLS)', () => {
  it('connect() and listen() exchange messages both ways; a close reaches the other side', async () => {
    const { listener, url, accepted } = await loopback();
    try {
      expect(listener.address).to.include({ host: '127.0.0.1', tls: false });
      expect(listener.address.port).to.be.greaterThan(0);
      const client = await connect(url, { tls: null, signal: new AbortController().signal });
      const server = await accepted();
      expect(client.peerName).to.equal(`secondary ${url}`);
      expect(server.peerName).to.match(/^primary 127\.0\.0\.1:\d+$/);
      client.send({ type: 'commit', generation: 1 });
      expect(await server.next(2000)).to.deep.equal({ type: 'commit', generation: 1 });
      server.send({ type: 'committed', generation: 1 });
      expect(await client.next(2000)).to.deep.equal({ type: 'committed', generation: 1 });
      client.close();
      const err = await server.closed;
      expect(err?.code).to.equal(ErrorCodes.CONNECTION);
      expect(err?.message).to.equal(`${server.peerName} closed the session`);
    } finally {
      await listener.close();
    }
  });

  it('gatherWriter: a message in parts goes to the socket unjoined and arrives whole, client to server and back (ws 8.x internals pinned)', async () => {
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false });
    await once(wss, 'listening');
    const serverSide = once(wss, 'connection');
    const client = new WebSocket(`ws://127.0.0.1:${(wss.address() as net.AddressInfo).port}`, { perMessageDeflate: false, generateMask: (m: Buffer) => void m.fill(0) });
    try {
      await once(client, 'open');
      const [server] = (await serverSide) as [WebSocket];
      for (const [from, to] of [[client, server], [server, client]] as const) {
        const gather = gatherWriter(from);
        expect(gather, 'this ws has the internals gatherWriter needs').to.not.equal(null);
        for (const size of [0, 100, 65536, 1024 * 1024 + 7]) {
          const parts = [Buffer.from([1, 2, 3]), randomBytes(size), Buffer.from('a tag of 16 byte')];
          const got = once(to, 'message') as Promise<[Buffer, boolean]>;
          let written = 0;
          expect(gather!(parts, () => written++), 'sent by the gather path').to.equal(true);
          const [data, isBinary] = await got;
          expect(isBinary).to.equal(true);
          expect(data.equals(Buffer.concat(parts)), `${size} bytes`).to.equal(true);
          expect(written).to.equal(1);
        }
      }
      // ws's own sends interleave with gathered ones in order.
      const order: string[] = [];
      server.on('message', (d: Buffer) => order.push(d.toString()));
      client.send('a');
      gatherWriter(client)!([Buffer.from('b'), Buffer.from('c')]);
      client.send('d');
      while (order.length < 3) await new Promise((r) => setTimeout(r, 5));
      expect(order).to.deep.equal(['a', 'bc', 'd']);
      // Not open: refused, so that the caller falls back to ws.send (which reports the closed socket).
      client.close();
      expect(gatherWriter(client)!([Buffer.from('x'), Buffer.from('y')])).to.equal(false);
    } finally {
      client.terminate();
      await new Promise((r) => wss.close(r));
    }
  });

  it('received data extents are joined into a reused ring and lent until released; a large message of another type is copied out (ws 8.x Receiver pinned)', async () => {
    const { listener, url, accepted } = await loopback();
    try {
      const client = await connect(url, { tls: null, signal: new AbortController().signal });
      const server = await accepted();
      const key = randomBytes(32);
      for (const [s, role] of [[client, 'primary'], [server, 'secondary']] as const) {
        s.beginHandshake(0);
        s.protect(key, role);
      }
      const MiB = 1024 * 1024;
      Object.assign(server.ctx, { volumeSize: 64 * MiB, chunkSize: 4096 });
      let seq = 0;
      const send = (fill: number) => {
        const payload = Buffer.alloc(MiB, fill);
        client.send({ type: 'extent', seq: ++seq, kind: 'data', offset: (seq % 64) * MiB, length: MiB, codec: 'raw', crc32c: crc32c(payload), payload });
      };
      const receive = async (fill: number) => {
        const m = (await server.next(5000)) as ExtentMsg;
        expect(m.type).to.equal('extent');
        expect(m.payload!.equals(Buffer.alloc(MiB, fill)), `payload of extent ${m.seq}`).to.equal(true);
        return m;
      };
      // 256 KiB of digests: ring-sized, but not a data extent, so it must not stay a view of the ring.
      const digests = randomBytes(256 * 1024);
      client.send({ type: 'digests', offset: 0, length: 64 * MiB, digests });
      const d = (await server.next(5000)) as { digests: Buffer };
      expect(server.channel.owns!(d.digests), 'digests copied out of the ring').to.equal(false);
      // The first extent is held, unreleased, while 47 more go through the 32 MiB ring and back.
      send(1);
      const held = await receive(1);
      expect(server.channel.owns!(held.payload!), 'a data extent is a view of the ring').to.equal(true);
      let owned = 0;
      for (let i = 0; i < 47; i++) {
        send(2 + i);
        const m = await receive(2 + i);
        if (server.channel.owns!(m.payload!)) owned++;
        server.release(m);
      }
      expect(held.payload!.equals(Buffer.alloc(MiB, 1)), 'the held extent was not written over').to.equal(true);
      expect(d.digests.equals(digests), 'the digests were not written over').to.equal(true);
      // Behind the held frame the ring fills once, then frames fall back to fresh buffers.
      expect(owned).to.be.within(25, 31);
      server.release(held);
      send(99);
      const after = await receive(99);
      expect(server.channel.owns!(after.payload!), 'ring reused once the held frame is back').to.equal(true);
      client.close();
    } finally {
      await listener.close();
    }
  });

  it('close() terminates the sessions it accepted and stops listening; it is idempotent', async () => {
    const { listener, url, accepted } = await loopback();
    const client = await connect(url, { tls: null, signal: new AbortController().signal });
    await accepted();
    await Promise.all([listener.close(), listener.close()]);
    const err = await client.closed;
    expect(err?.code).to.equal(ErrorCodes.CONNECTION);
    expect(err?.message).to.contain('code 1006');
    const again = await rejection(connect(url, { tls: null, signal: new AbortController().signal }));
    expect(again.code).to.equal(ErrorCodes.CONNECTION);
  });

  it('answers a plain HTTP request with 426', async () => {
    const { listener, url } = await loopback();
    try {
      const res = await new Promise<http.IncomingMessage>((resolve, reject) => http.get(url.replace('ws:', 'http:'), resolve).on('error', reject));
      let body = '';
      for await (const chunk of res.setEncoding('utf8')) body += chunk as string;
      expect(res.statusCode).to.equal(426);
      expect(body).to.equal('thinmirror: WebSocket upgrade required\n');
    } finally {
      await listener.close();
    }
  });

  it('a port already in use is TM_ERR_CONNECTION naming host:port', async () => {
    const { listener } = await loopback();
    try {
      const { port } = listener.address;
      const err = await rejection(listen({ host: '127.0.0.1', port, tls: null, log, onSession: () => {} }));
      expect(err.code).to.equal(ErrorCodes.CONNECTION);
      expect(err.message).to.contain(`listening on 127.0.0.1:${port}`);
    } finally {
      await listener.close();
    }
  });

  it('connect() to a closed port is TM_ERR_CONNECTION "cannot connect to <url>" with the cause', async () => {
    const url = `ws://127.0.0.1:${await closedPort()}`;
    const err = await rejection(connect(url, { tls: null, signal: new AbortController().signal }));
    expect(err.code).to.equal(ErrorCodes.CONNECTION);
    expect(err.message).to.match(new RegExp(`^cannot connect to ${url}: connect ECONNREFUSED`));
    expect((err.cause as NodeJS.ErrnoException).code).to.equal('ECONNREFUSED');
  });

  it('aborting the signal during the upgrade terminates the socket and rejects with TM_ERR_CONNECTION', async () => {
    // A server that accepts TCP and never answers the upgrade.
    const sockets: net.Socket[] = [];
    const silent = net.createServer((s) => sockets.push(s)).listen(0, '127.0.0.1');
    await once(silent, 'listening');
    try {
      const url = `ws://127.0.0.1:${(silent.address() as net.AddressInfo).port}`;
      const ac = new AbortController();
      const pending = rejection(connect(url, { tls: null, signal: ac.signal }));
      await once(silent, 'connection');
      const closed = once(sockets[0]!, 'close');
      ac.abort();
      const err = await pending;
      expect(err.code).to.equal(ErrorCodes.CONNECTION);
      expect(err.message).to.contain(`cannot connect to ${url}`);
      await closed; // the client's socket is gone
      // A signal aborted before connect() is honoured as well.
      const early = await rejection(connect(url, { tls: null, signal: AbortSignal.abort() }));
      expect(early.code).to.equal(ErrorCodes.CONNECTION);
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise((r) => silent.close(r));
    }
  });
});
