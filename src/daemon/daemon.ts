import * as http from 'node:http';
import { promises as fsp } from 'node:fs';
import { createRequire } from 'node:module';
import { pino, type Logger } from 'pino';
import { WebSocketServer, type WebSocket } from 'ws';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { PrimaryMirror } from '../mirror/primary.js';
import { SecondaryMirror } from '../mirror/secondary.js';
import type { MirrorStatus } from '../mirror/status.js';
import { refuse, secondaryHandshake } from '../wire/handshake.js';
import { MAX_EXTENT_BYTES } from '../wire/messages.js';
import { Session } from '../wire/session.js';
import { readPsk, type DaemonConfig, type MirrorConfig } from './config.js';
import { startControlServer, startMetricsServer, type DaemonStatus, type MirrorStatusEntry } from './control.js';
import { acquireLock } from './lock.js';
import { MirrorMetrics } from './metrics.js';

export const VERSION: string = (createRequire(import.meta.url)('../../package.json') as { version: string }).version;

type Entry = { config: MirrorConfig; mirror: PrimaryMirror | SecondaryMirror | null; startError: TmError | null };

/**
 * One daemon per host: owns every mirror of the config (primary and secondary
 * at once), the WebSocket listener for secondaries and the control socket.
 */
export class Daemon {
  private readonly entries = new Map<string, Entry>();
  private wss: WebSocketServer | null = null;
  private httpServer: http.Server | null = null;
  private control: http.Server | null = null;
  private metricsServer: http.Server | null = null;
  private metricsAddr: { host: string; port: number } | null = null;
  private metrics: MirrorMetrics | null = null;
  private releaseLock: (() => Promise<void>) | null = null;
  private stopping: Promise<void> | null = null;
  private listenAddr: { host: string; port: number } | null = null;
  private readonly startedAt = new Date();
  private psk!: Buffer;

  private constructor(
    readonly config: DaemonConfig,
    readonly log: Logger,
  ) {}

  static async start(config: DaemonConfig, log?: Logger): Promise<Daemon> {
    const d = new Daemon(config, log ?? pino({ level: config.node.logLevel, base: { node: config.node.name } }));
    try {
      await d.init();
    } catch (e) {
      await d.stop().catch(() => {});
      throw e;
    }
    return d;
  }

  private async init(): Promise<void> {
    const c = this.config;
    await fsp.mkdir(c.node.stateDir, { recursive: true, mode: 0o700 }).catch((e) => {
      throw asTmError(e, ErrorCodes.STATE, `state directory ${c.node.stateDir}`);
    });
    this.releaseLock = await acquireLock(c.node.stateDir);
    this.psk = await readPsk(c.auth.pskFile);
    for (const m of c.mirrors) this.entries.set(m.name, { config: m, mirror: null, startError: null });
    // Secondaries first, so that a daemon holding both can receive at once.
    for (const e of this.entries.values()) if (e.config.role === 'secondary') await this.startMirror(e);
    if (c.listen) await this.listen(c.listen.host, c.listen.port);
    for (const e of this.entries.values()) if (e.config.role === 'primary') await this.startMirror(e);
    // Observed every second from here on: error transitions, cycles and the progress rate.
    const metrics = new MirrorMetrics(() => [...this.entries.values()].map((e) => ({ status: () => this.rawStatus(e) })), { node: c.node.name, version: VERSION });
    this.metrics = metrics;
    metrics.start(1000);
    const scrape = async () => ({ contentType: metrics.contentType, body: await metrics.scrape() });
    this.control = await startControlServer(c.node.stateDir, { status: () => this.status(), metrics: scrape });
    if (c.metrics) {
      this.metricsServer = await startMetricsServer(c.metrics.host, c.metrics.port, scrape);
      const a = this.metricsServer.address();
      this.metricsAddr = a && typeof a === 'object' ? { host: a.address, port: a.port } : { ...c.metrics };
    }
    this.log.info({ version: VERSION, mirrors: c.mirrors.length, listen: this.listenAddr, metrics: this.metricsAddr, config: c.sourcePath }, 'daemon started');
  }

  private async startMirror(e: Entry): Promise<void> {
    const log = this.log.child({ mirror: e.config.name });
    try {
      const m =
        e.config.role === 'primary'
          ? new PrimaryMirror(e.config, { nodeName: this.config.node.name, stateDir: this.config.node.stateDir, psk: this.psk, log })
          : new SecondaryMirror(e.config, this.config.node.stateDir, log);
      await m.start();
      e.mirror = m;
    } catch (err) {
      e.startError = asTmError(err, ErrorCodes.INTERNAL, `mirror ${e.config.name}`);
      log.error({ code: e.startError.code }, `mirror cannot start: ${e.startError.message}`);
    }
  }

  private async listen(host: string, port: number): Promise<void> {
    const server = http.createServer((_req, res) => {
      res.writeHead(426, { 'content-type': 'text/plain' });
      res.end('thinmirror: WebSocket upgrade required\n');
    });
    this.wss = new WebSocketServer({ server, perMessageDeflate: false, maxPayload: MAX_EXTENT_BYTES + 65536 });
    this.wss.on('connection', (ws: WebSocket, req: http.IncomingMessage) => {
      const peer = `primary ${req.socket.remoteAddress}:${req.socket.remotePort}`;
      this.onConnection(new Session(ws, peer)).catch(() => {});
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e) => reject(asTmError(e, ErrorCodes.CONNECTION, `listening on ${host}:${port}`)));
      server.listen(port, host, () => resolve());
    });
    this.httpServer = server;
    const a = server.address();
    this.listenAddr = a && typeof a === 'object' ? { host: a.address, port: a.port } : { host, port };
  }

  private async onConnection(session: Session): Promise<void> {
    try {
      const { hello, auth } = await secondaryHandshake(session, { node: this.config.node.name, psk: this.psk });
      const e = this.entries.get(hello.mirror);
      if (!e || e.config.role !== 'secondary') {
        throw refuse(session, new TmError(ErrorCodes.UNKNOWN_MIRROR, `node ${this.config.node.name} holds no secondary mirror named "${hello.mirror}" (asked by ${hello.node})`));
      }
      if (!e.mirror) throw refuse(session, e.startError ?? new TmError(ErrorCodes.INTERNAL, `mirror ${hello.mirror} is not running`));
      await (e.mirror as SecondaryMirror).accept(session, hello, auth);
    } catch (err) {
      const te = asTmError(err, ErrorCodes.PROTOCOL, session.peerName);
      if (session.isOpen) session.fail(te);
      this.log.warn({ code: te.code, peer: session.peerName }, `session refused: ${te.message}`);
    }
  }

  private async rawStatus(e: Entry): Promise<MirrorStatus> {
    return e.mirror ? e.mirror.status() : placeholderStatus(e);
  }

  async status(): Promise<DaemonStatus> {
    const mirrors: MirrorStatusEntry[] = [];
    for (const e of this.entries.values()) {
      const m = await this.rawStatus(e);
      mirrors.push({ ...m, rateBytesPerSecond: m.progress ? (this.metrics?.rateOf(m.name) ?? null) : null });
    }
    return {
      node: this.config.node.name,
      pid: process.pid,
      version: VERSION,
      startedAt: this.startedAt.toISOString(),
      listen: this.listenAddr,
      metrics: this.metricsAddr,
      mirrors,
    };
  }

  /** Stop every mirror, persist state, close sockets, release the lock. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.metrics?.stop();
      await Promise.all([...this.entries.values()].map((e) => e.mirror?.stop().catch((err) => this.log.error({ err }, 'stopping mirror failed'))));
      for (const ws of this.wss?.clients ?? []) ws.terminate();
      this.wss?.close();
      await new Promise((r) => (this.httpServer ? this.httpServer.close(r) : r(undefined)));
      await new Promise((r) => (this.control ? this.control.close(r) : r(undefined)));
      this.metricsServer?.closeAllConnections();
      await new Promise((r) => (this.metricsServer ? this.metricsServer.close(r) : r(undefined)));
      await this.releaseLock?.();
      this.log.info('daemon stopped');
    })();
    return this.stopping;
  }
}

function placeholderStatus(e: Entry): MirrorStatus {
  return {
    name: e.config.name,
    role: e.config.role,
    state: 'error',
    volume: e.config.volume,
    peer: e.config.peer ?? null,
    trackingMode: e.config.role === 'primary' ? e.config.tracking.mode : null,
    chunkSize: e.config.chunkSize,
    volumeBytes: 0,
    allocatedBytes: 0,
    sentBytes: 0,
    wireBytes: 0,
    dirtyBytes: 0,
    generation: 0,
    committedGeneration: 0,
    lagSeconds: null,
    progress: null,
    lastCycle: null,
    error: e.startError ? e.startError.toJSON() : null,
  };
}
