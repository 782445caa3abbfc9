import * as net from 'node:net';
import { ErrorCodes, TmError } from '../../src/errors.js';
import { sleep } from '../../src/util/sleep.js';

/** Which way bytes travel through the proxy: client -> target or target -> client. */
export type Direction = 'toTarget' | 'toClient';

export interface FaultProxyOptions {
  /** Where every accepted connection is forwarded. */
  target: { host: string; port: number };
  /** Port to listen on (127.0.0.1); 0 or absent: an ephemeral port. */
  listenPort?: number;
}

/** What the proxy has done so far. Bytes count what was forwarded, not what was received. */
export interface FaultProxyCounters {
  /** Bytes written to the target side (client -> target). */
  bytesToTarget: number;
  /** Bytes written to the client side (target -> client). */
  bytesToClient: number;
  /** Connections accepted and forwarded (refused ones not included). */
  accepted: number;
  /** Connections closed at once because {@link FaultProxy.refuse} was on. */
  refused: number;
  /** Calls of {@link FaultProxy.cut}. */
  cuts: number;
  /** Bytes flipped by {@link FaultProxy.corruptNext}. */
  corrupted: number;
}

export interface CorruptOptions {
  direction: Direction;
  /** Bytes to let pass unchanged (counted from now, over all connections in that direction). */
  afterBytes: number;
  /** XOR mask for the flipped byte; 0xff by default. Must not be 0. */
  xor?: number;
}

/** Which byte {@link FaultProxy.corruptNext} flipped. */
export interface CorruptionReport {
  direction: Direction;
  /** Id of the connection (1, 2, ... in accept order). */
  connection: number;
  /** Offset of the byte within that connection's stream in that direction. */
  connectionOffset: number;
  before: number;
  after: number;
}

interface PendingCorruption {
  /** Absolute offset in the proxy-wide forwarded byte count of the direction. */
  at: number;
  xor: number;
  resolve: (r: CorruptionReport) => void;
}

/** Queue above which the reading side is paused (backpressure). */
const HIGH_WATER = 256 * 1024;

/**
 * One direction of one connection: bytes read from `src` wait in a FIFO queue
 * and are written to `dst` by a single pump, so delays never reorder them. The
 * source is paused while the queue is long, while the proxy is stalled, or
 * while `dst` has not drained: a slow or stalled path pushes back on the
 * sender instead of buffering without bound.
 */
class Pipe {
  private readonly queue: { data: Buffer; at: number }[] = [];
  /** Bytes read from `src` and not yet forwarded. */
  queued = 0;
  private pumping = false;
  private srcEnded = false;
  private dead = false;
  /** Bytes forwarded on this connection in this direction. */
  forwarded = 0;

  constructor(
    private readonly proxy: FaultProxy,
    readonly conn: Connection,
    readonly direction: Direction,
    private readonly src: net.Socket,
    private readonly dst: net.Socket,
  ) {
    src.on('data', (chunk: Buffer) => this.onData(chunk));
    src.on('end', () => {
      this.srcEnded = true;
      this.pump();
    });
  }

  private onData(chunk: Buffer): void {
    if (this.dead) return;
    this.queue.push({ data: chunk, at: Date.now() });
    this.queued += chunk.length;
    if (this.queued >= HIGH_WATER || this.proxy.isStalled) this.src.pause();
    this.pump();
  }

  /** Stop for good (the connection is gone); queued bytes are dropped. */
  kill(): void {
    this.dead = true;
    this.queue.length = 0;
    this.queued = 0;
  }

  /** Pause the source because the proxy is stalled. */
  stall(): void {
    if (!this.dead) this.src.pause();
  }

  /** Undo {@link stall}: read again (unless the queue is long) and forward what waits. */
  resume(): void {
    if (this.dead) return;
    if (this.queued < HIGH_WATER) this.src.resume();
    this.pump();
  }

  /** Forward queued chunks in order; one pump at a time per pipe. */
  pump(): void {
    if (this.pumping || this.dead) return;
    this.pumping = true;
    this.run()
      .catch(() => this.conn.destroy())
      .finally(() => {
        this.pumping = false;
        // A pump() that came while this one was ending (a resume) found it busy: it would be lost.
        if (!this.dead && !this.proxy.isStalled && this.queue.length > 0) this.pump();
      });
  }

  private async run(): Promise<void> {
    while (!this.dead && !this.proxy.isStalled) {
      const head = this.queue[0];
      if (!head) break;
      const due = head.at + this.proxy.delayMs;
      const wait = due - Date.now();
      if (wait > 0) {
        await sleep(wait, this.proxy.signal);
        continue; // re-check stall, cut, close and the delay (it may have changed)
      }
      this.queue.shift();
      this.queued -= head.data.length;
      const data = this.proxy.applyCorruption(this, head.data);
      this.forwarded += data.length;
      this.proxy.countForwarded(this.direction, data.length);
      if (!this.dst.write(data)) await drainOrClose(this.dst);
      if (this.queued < HIGH_WATER && !this.proxy.isStalled && !this.dead) this.src.resume();
    }
    if (!this.dead && this.srcEnded && this.queue.length === 0 && !this.dst.destroyed) this.dst.end();
  }
}

function drainOrClose(s: net.Socket): Promise<void> {
  if (s.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      s.off('drain', done);
      s.off('close', done);
      resolve();
    };
    s.on('drain', done);
    s.on('close', done);
  });
}

/** One accepted client connection and its connection to the target. */
class Connection {
  readonly toTarget: Pipe;
  readonly toClient: Pipe;
  private gone = false;

  constructor(
    proxy: FaultProxy,
    readonly id: number,
    readonly client: net.Socket,
    readonly upstream: net.Socket,
    private readonly onGone: (c: Connection) => void,
  ) {
    this.toTarget = new Pipe(proxy, this, 'toTarget', client, upstream);
    this.toClient = new Pipe(proxy, this, 'toClient', upstream, client);
    // A side that closes with an error (reset, refused) takes the other one
    // down at once; a clean close ends the other side through the pipe, after
    // its queued bytes have gone.
    const onClose = (hadError: boolean) => {
      if (hadError) this.destroy();
      else this.finish();
    };
    client.on('close', onClose);
    upstream.on('close', onClose);
  }

  /** Destroy both sockets, dropping whatever is queued. */
  destroy(): void {
    this.toTarget.kill();
    this.toClient.kill();
    this.client.destroy();
    this.upstream.destroy();
    this.finish();
  }

  /** Forget the connection once both sockets are gone. */
  private finish(): void {
    if (this.gone) return;
    if (!this.client.destroyed || !this.upstream.destroyed) return;
    this.gone = true;
    this.toTarget.kill();
    this.toClient.kill();
    this.onGone(this);
  }
}

/**
 * A TCP proxy on loopback that injects network faults between two daemons in
 * integration tests. Every accepted connection is forwarded to `target`; the
 * controls act on live connections and on new ones:
 *
 * - {@link delay}: hold every chunk `ms` after it arrived, per direction, in order;
 * - {@link stall} / {@link resume}: stop forwarding without closing anything
 *   (the sockets are paused, so the senders feel backpressure);
 * - {@link cut}: destroy every current connection on both sides;
 * - {@link refuse}: close new connections at once;
 * - {@link corruptNext}: flip one byte once, after N more bytes in a direction.
 *
 * Errors on every socket are swallowed (ECONNRESET during a cut is normal); the
 * last one is kept in {@link lastSocketError} for debugging.
 */
export class FaultProxy {
  readonly counters: FaultProxyCounters = { bytesToTarget: 0, bytesToClient: 0, accepted: 0, refused: 0, cuts: 0, corrupted: 0 };
  /** The last error seen on any socket (informational). */
  lastSocketError: Error | null = null;
  private readonly connections = new Set<Connection>();
  private readonly corruptions: Record<Direction, PendingCorruption[]> = { toTarget: [], toClient: [] };
  private readonly abort = new AbortController();
  private stalled = false;
  private refusing = false;
  private delay_ = 0;
  private nextId = 1;
  private closing: Promise<void> | null = null;

  private constructor(
    private readonly server: net.Server,
    readonly target: { host: string; port: number },
  ) {
    server.on('connection', (s) => this.accept(s));
    server.on('error', (e: Error) => (this.lastSocketError = e));
  }

  /** Start listening on 127.0.0.1. Rejects with TM_ERR_CONNECTION when the port is taken. */
  static async start(opts: FaultProxyOptions): Promise<FaultProxy> {
    const server = net.createServer({ allowHalfOpen: true });
    await new Promise<void>((resolve, reject) => {
      const onError = (e: Error) =>
        reject(new TmError(ErrorCodes.CONNECTION, `fault proxy cannot listen on 127.0.0.1:${opts.listenPort ?? 0}: ${e.message}`, { cause: e }));
      server.once('error', onError);
      server.listen(opts.listenPort ?? 0, '127.0.0.1', () => {
        server.off('error', onError);
        resolve();
      });
    });
    return new FaultProxy(server, { ...opts.target });
  }

  /** The port the proxy listens on. */
  get port(): number {
    const a = this.server.address();
    if (a === null || typeof a === 'string') throw new TmError(ErrorCodes.INTERNAL, 'fault proxy is not listening');
    return a.port;
  }

  /** `host:port` of the proxy, for a peer URL. */
  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** Connections currently forwarded. */
  get activeConnections(): number {
    return this.connections.size;
  }

  /** The most bytes any current connection has forwarded to the target (0 without one). */
  get liveBytesToTarget(): number {
    let n = 0;
    for (const c of this.connections) n = Math.max(n, c.toTarget.forwarded);
    return n;
  }

  /** Bytes read by the proxy and not yet forwarded, over all connections and both directions. */
  get queuedBytes(): number {
    let n = 0;
    for (const c of this.connections) n += c.toTarget.queued + c.toClient.queued;
    return n;
  }

  get isStalled(): boolean {
    return this.stalled;
  }

  get delayMs(): number {
    return this.delay_;
  }

  /** Aborted by {@link close}: wakes every pump that waits for a delay. */
  get signal(): AbortSignal {
    return this.abort.signal;
  }

  /**
   * Hold every chunk `ms` milliseconds after it arrived, in both directions
   * (0: no delay). Order is kept; it is latency, not a bandwidth limit. Applies
   * to chunks already queued too.
   */
  delay(ms: number): void {
    if (!Number.isFinite(ms) || ms < 0) throw new TmError(ErrorCodes.INTERNAL, `fault proxy: invalid delay ${ms}`);
    this.delay_ = ms;
  }

  /**
   * Stop forwarding in both directions without closing anything. Reading stops
   * (backpressure reaches the senders); bytes already handed to an outgoing
   * socket still go out.
   */
  stall(): void {
    this.stalled = true;
    for (const c of this.connections) {
      c.toTarget.stall();
      c.toClient.stall();
    }
  }

  /** Undo {@link stall}: forward what waited, in order, and read again. */
  resume(): void {
    this.stalled = false;
    for (const c of this.connections) {
      c.toTarget.resume();
      c.toClient.resume();
    }
  }

  /** Destroy every current connection, both sides; returns how many. New connections are still accepted. */
  cut(): number {
    this.counters.cuts++;
    const live = [...this.connections];
    for (const c of live) c.destroy();
    return live.length;
  }

  /** While on, new connections are closed as soon as they are accepted. */
  refuse(on: boolean): void {
    this.refusing = on;
  }

  /**
   * Let `afterBytes` more bytes pass in `direction` (over all connections), then
   * XOR the next byte with `xor` (0xff by default). Once. Resolves when the
   * byte has been flipped (never rejects; stays pending if it never happens).
   */
  corruptNext(opts: CorruptOptions): Promise<CorruptionReport> {
    const xor = opts.xor ?? 0xff;
    if (!Number.isSafeInteger(opts.afterBytes) || opts.afterBytes < 0) {
      throw new TmError(ErrorCodes.INTERNAL, `fault proxy: invalid afterBytes ${opts.afterBytes}`);
    }
    if (!Number.isInteger(xor) || xor < 1 || xor > 0xff) throw new TmError(ErrorCodes.INTERNAL, `fault proxy: invalid xor ${xor}`);
    const base = opts.direction === 'toTarget' ? this.counters.bytesToTarget : this.counters.bytesToClient;
    return new Promise((resolve) => {
      const list = this.corruptions[opts.direction];
      list.push({ at: base + opts.afterBytes, xor, resolve });
      list.sort((a, b) => a.at - b.at);
    });
  }

  /** Destroy every connection, stop listening; resolves when the server is closed. Idempotent. */
  close(): Promise<void> {
    if (!this.closing) {
      this.closing = new Promise<void>((resolve) => {
        this.refusing = true;
        this.abort.abort();
        this.server.close(() => resolve());
        for (const c of [...this.connections]) c.destroy();
      });
    }
    return this.closing;
  }

  /** Called by a pipe for every chunk just before it is written: flip any armed byte in it. */
  applyCorruption(pipe: Pipe, data: Buffer): Buffer {
    const list = this.corruptions[pipe.direction];
    const start = pipe.direction === 'toTarget' ? this.counters.bytesToTarget : this.counters.bytesToClient;
    let out = data;
    while (list.length > 0 && list[0]!.at < start + data.length) {
      const c = list.shift()!;
      const i = c.at - start;
      if (out === data) out = Buffer.from(data); // never modify a buffer someone else may hold
      const before = out[i]!;
      out[i] = before ^ c.xor;
      this.counters.corrupted++;
      c.resolve({ direction: pipe.direction, connection: pipe.conn.id, connectionOffset: pipe.forwarded + i, before, after: out[i]! });
    }
    return out;
  }

  countForwarded(direction: Direction, n: number): void {
    if (direction === 'toTarget') this.counters.bytesToTarget += n;
    else this.counters.bytesToClient += n;
  }

  private accept(client: net.Socket): void {
    client.on('error', (e: Error) => (this.lastSocketError = e));
    if (this.refusing) {
      this.counters.refused++;
      client.destroy();
      return;
    }
    this.counters.accepted++;
    const upstream = net.connect({ host: this.target.host, port: this.target.port, allowHalfOpen: true });
    upstream.on('error', (e: Error) => (this.lastSocketError = e));
    client.setNoDelay(true);
    upstream.setNoDelay(true);
    const conn = new Connection(this, this.nextId++, client, upstream, (c) => this.connections.delete(c));
    this.connections.add(conn);
    if (this.stalled) {
      conn.toTarget.stall();
      conn.toClient.stall();
    }
  }
}
