import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import * as net from 'node:net';
import { WebSocket, WebSocketServer, type RawData } from 'ws';
import { FaultProxy } from '../helpers/fault-proxy.js';

/** A TCP echo server on an ephemeral loopback port. */
async function echoServer(): Promise<{ port: number; close: () => Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on('error', () => {});
    s.on('close', () => sockets.delete(s));
    s.pipe(s);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

/** A client socket that collects every byte it receives and how it ended. */
class Client {
  readonly socket: net.Socket;
  private readonly chunks: Buffer[] = [];
  private received = 0;
  private waiters: { n: number; resolve: () => void }[] = [];
  readonly closed: Promise<void>;
  readonly connected: Promise<void>;

  constructor(port: number) {
    this.socket = net.connect({ host: '127.0.0.1', port });
    this.socket.on('error', () => {});
    this.connected = new Promise((r) => this.socket.once('connect', () => r()));
    this.closed = new Promise((r) => this.socket.once('close', () => r()));
    this.socket.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.received += b.length;
      const ready = this.waiters.filter((w) => w.n <= this.received);
      this.waiters = this.waiters.filter((w) => w.n > this.received);
      for (const w of ready) w.resolve();
    });
  }

  get data(): Buffer {
    return Buffer.concat(this.chunks);
  }

  /** Resolves once `n` bytes in total have arrived. */
  receive(n: number): Promise<Buffer> {
    if (this.received >= n) return Promise.resolve(this.data);
    return new Promise((resolve) => this.waiters.push({ n, resolve: () => resolve(this.data) }));
  }
}

/** Let the event loop turn a few times (sockets get to read and write). */
async function ticks(n = 20): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
}

describe('FaultProxy (test helper): faults injected between two sockets', () => {
  let echo: Awaited<ReturnType<typeof echoServer>>;
  let proxy: FaultProxy;
  const clients: Client[] = [];

  function client(): Client {
    const c = new Client(proxy.port);
    clients.push(c);
    return c;
  }

  beforeEach(async () => {
    echo = await echoServer();
    proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: echo.port } });
  });

  afterEach(async () => {
    for (const c of clients.splice(0)) c.socket.destroy();
    await proxy.close();
    await echo.close();
  });

  it('forwards bytes unchanged both ways and counts them', async () => {
    const c = client();
    const payload = randomBytes(1024 * 1024 + 17);
    c.socket.write(payload);
    const got = await c.receive(payload.length);
    expect(got.equals(payload)).to.equal(true);
    expect(proxy.counters.bytesToTarget).to.equal(payload.length);
    expect(proxy.counters.bytesToClient).to.equal(payload.length);
    expect(proxy.counters.accepted).to.equal(1);
    expect(proxy.counters.corrupted).to.equal(0);
  });

  it('corruptNext flips exactly the byte after N more bytes, once, in the chosen direction', async () => {
    const c = client();
    const first = randomBytes(100);
    c.socket.write(first);
    await c.receive(100);
    // 100 bytes have passed each way; flip the 51st byte of what goes to the target next.
    const report = proxy.corruptNext({ direction: 'toTarget', afterBytes: 50, xor: 0x5a });
    const second = randomBytes(4096);
    c.socket.write(second);
    const got = await c.receive(100 + second.length);
    const r = await report;
    expect(r).to.deep.include({ direction: 'toTarget', connection: 1, connectionOffset: 150, before: second[50], after: second[50]! ^ 0x5a });
    const expected = Buffer.concat([first, second]);
    expected[150] = expected[150]! ^ 0x5a;
    expect(got.equals(expected)).to.equal(true);
    // Only once: more bytes pass unchanged.
    const third = randomBytes(1000);
    c.socket.write(third);
    const all = await c.receive(expected.length + third.length);
    expect(all.subarray(expected.length).equals(third)).to.equal(true);
    expect(proxy.counters.corrupted).to.equal(1);
  });

  it('corruptNext toClient flips the byte on the way back only', async () => {
    const c = client();
    const report = proxy.corruptNext({ direction: 'toClient', afterBytes: 3000 });
    const payload = randomBytes(8000);
    c.socket.write(payload);
    const got = await c.receive(payload.length);
    expect((await report).connectionOffset).to.equal(3000);
    const diff = [...got].flatMap((b, i) => (b !== payload[i] ? [i] : []));
    expect(diff).to.deep.equal([3000]);
    expect(got[3000]).to.equal(payload[3000]! ^ 0xff);
  });

  it('cut drops the live connection on both sides; a new connection works', async () => {
    const c1 = client();
    c1.socket.write('hello');
    await c1.receive(5);
    expect(proxy.activeConnections).to.equal(1);
    proxy.cut();
    await c1.closed;
    expect(proxy.counters.cuts).to.equal(1);
    const c2 = client();
    c2.socket.write('again');
    expect((await c2.receive(5)).toString()).to.equal('again');
    expect(proxy.counters.accepted).to.equal(2);
    expect(proxy.activeConnections).to.equal(1);
  });

  it('stall holds bytes without closing; resume delivers them all, in order', async () => {
    const c = client();
    await c.connected;
    c.socket.write('a');
    await c.receive(1);
    proxy.stall();
    const parts = Array.from({ length: 50 }, (_, i) => Buffer.from(`part-${i};`));
    for (const p of parts) c.socket.write(p);
    await ticks();
    expect(c.data.toString()).to.equal('a');
    expect(c.socket.destroyed).to.equal(false);
    proxy.resume();
    const want = 'a' + parts.map((p) => p.toString()).join('');
    expect((await c.receive(want.length)).toString()).to.equal(want);
  });

  it('stall pushes back on the sender: the proxy reads a bounded amount, the rest waits at the sender', async () => {
    const c = client();
    await c.connected;
    proxy.stall();
    const total = 48 * 1024 * 1024;
    const block = Buffer.alloc(1024 * 1024, 7);
    for (let i = 0; i < total / block.length; i++) c.socket.write(block);
    // Wait until the transfer has settled (nothing moves any more), however long that takes.
    let last = -1;
    for (let stable = 0; stable < 5; ) {
      await new Promise((r) => setTimeout(r, 10));
      const now = c.socket.writableLength;
      stable = now === last ? stable + 1 : 0;
      last = now;
    }
    expect(c.data.length).to.equal(0);
    // A proxy that did not pause its sockets would have read everything into memory.
    // (Kernel socket buffers hold some MiB; the rest still waits in the sender.)
    expect(proxy.queuedBytes).to.be.at.most(512 * 1024);
    expect(c.socket.writableLength).to.be.greaterThan(0);
    proxy.resume();
    const got = await c.receive(total);
    expect(got.length).to.equal(total);
    expect(got.every((b) => b === 7)).to.equal(true);
    expect(proxy.queuedBytes).to.equal(0);
  });

  it('a stall also holds connections accepted while stalled', async () => {
    proxy.stall();
    const c = client();
    await c.connected;
    c.socket.write('late');
    await ticks();
    expect(c.data.length).to.equal(0);
    proxy.resume();
    expect((await c.receive(4)).toString()).to.equal('late');
  });

  it('delay keeps the order of chunks in each direction', async () => {
    proxy.delay(5);
    const c = client();
    await c.connected;
    const parts = Array.from({ length: 30 }, (_, i) => Buffer.from(`${i},`));
    for (const p of parts) {
      c.socket.write(p);
      await ticks(1);
    }
    const want = parts.map((p) => p.toString()).join('');
    expect((await c.receive(want.length)).toString()).to.equal(want);
    proxy.delay(0);
  });

  it('refuse closes new connections at once; off again, connections work', async () => {
    proxy.refuse(true);
    const c1 = client();
    c1.socket.write('x');
    await c1.closed;
    expect(c1.data.length).to.equal(0);
    expect(proxy.counters.refused).to.equal(1);
    expect(proxy.counters.accepted).to.equal(0);
    proxy.refuse(false);
    const c2 = client();
    c2.socket.write('ok');
    expect((await c2.receive(2)).toString()).to.equal('ok');
  });

  it('a half-close is forwarded: the client ends, the echo ends, both sides close', async () => {
    const c = client();
    c.socket.end('bye');
    await c.closed;
    expect(c.data.toString()).to.equal('bye');
    await ticks();
    expect(proxy.activeConnections).to.equal(0);
  });

  it('a target that is down: the client connection is closed', async () => {
    await echo.close();
    const c = client();
    await c.closed;
    expect(c.data.length).to.equal(0);
    echo = await echoServer(); // for afterEach
  });

  it('close destroys live connections and resolves', async () => {
    const c = client();
    c.socket.write('x');
    await c.receive(1);
    await proxy.close();
    await c.closed;
    expect(c.socket.destroyed).to.equal(true);
  });
});

describe('FaultProxy with a real ws WebSocket', () => {
  it('a byte flipped inside a binary message payload is delivered corrupted (no WebSocket check catches it)', async () => {
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false });
    await new Promise<void>((r) => wss.once('listening', () => r()));
    const wssPort = (wss.address() as net.AddressInfo).port;
    const proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port: wssPort } });
    const received = new Promise<Buffer>((resolve) => {
      wss.on('connection', (ws) => {
        ws.on('message', (data: RawData) => resolve(Buffer.isBuffer(data) ? data : Buffer.concat(data as Buffer[])));
      });
    });
    const client = new WebSocket(`ws://127.0.0.1:${proxy.port}/`, { perMessageDeflate: false });
    const errors: Error[] = [];
    client.on('error', (e) => errors.push(e));
    try {
      await new Promise<void>((resolve, reject) => {
        client.once('open', () => resolve());
        client.once('error', reject);
      });
      // The upgrade request has passed; the next bytes to the target are the frame:
      // 2 header bytes + 2 bytes of 16-bit length (payload 126..65535) + 4 bytes of mask.
      const payload = randomBytes(1000);
      const report = proxy.corruptNext({ direction: 'toTarget', afterBytes: 8 + 500, xor: 0x10 });
      client.send(payload, { binary: true });
      const got = await received;
      await report;
      expect(got.length).to.equal(payload.length);
      const diff = [...got].flatMap((b, i) => (b !== payload[i] ? [i] : []));
      // Masking is XOR, so the flip lands on the same payload byte, unmasked.
      expect(diff).to.deep.equal([500]);
      expect(got[500]).to.equal(payload[500]! ^ 0x10);
      expect(errors).to.deep.equal([]);
    } finally {
      client.terminate();
      await proxy.close();
      await new Promise<void>((r) => wss.close(() => r()));
    }
  });
});
