import type * as http from 'node:http';
import { createRequire } from 'node:module';
import { pino, type Logger } from 'pino';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { Mirror, serveSession, type RoleChangeReport } from '../mirror/mirror.js';
import type { MirrorStatus } from '../mirror/status.js';
import { readTlsFiles } from '../wire/tls.js';
import { listen, type Listener } from '../wire/transport.js';
import { BandwidthRegistry, throttle } from '../wire/bandwidth.js';
import { loadConfig, peerKey, type DaemonConfig, type MirrorConfig } from './config.js';
import { startControlServer, startMetricsServer, type DaemonStatus, type DrillHandlers, type MirrorStatusEntry, type RoleAction } from './control.js';
import { acquireLock } from './lock.js';
import { readPsk } from './psk.js';
import { prepareStateDir } from './state-dir.js';
import { MirrorMetrics } from './metrics.js';
import { checkReloadable, diffMirrors, reportOf, type LastReload, type ReloadReport } from './reload.js';

export const VERSION: string = (createRequire(import.meta.url)('../../package.json') as { version: string }).version;

type Entry = { config: MirrorConfig; mirror: Mirror };

/**
 * One daemon per host: owns every mirror of the config (primary and secondary
 * at once), the WebSocket listener for secondaries and the control socket.
 */
export class Daemon {
  /** A reload sets or deletes one mirror's entry at a time, and at its end replaces the map to follow the new config's order. */
  private entries = new Map<string, Entry>();
  private listener: Listener | null = null;
  private control: http.Server | null = null;
  private metricsServer: http.Server | null = null;
  private metricsAddr: { host: string; port: number } | null = null;
  private metrics: MirrorMetrics | null = null;
  private releaseLock: (() => Promise<void>) | null = null;
  private stopping: Promise<void> | null = null;
  private listenAddr: { host: string; port: number; tls: boolean } | null = null;
  private readonly startedAt = new Date();
  private psk!: Buffer;
  /** Token buckets of the bandwidth caps: per mirror, and per peer shared by its mirrors. */
  private readonly bandwidth = new BandwidthRegistry();

  /** Reloads run one at a time, in the order asked (SIGHUP). */
  private reloading: Promise<unknown> = Promise.resolve();
  private lastReload: LastReload | null = null;
  private configLoadedAt = new Date();

  private constructor(
    private cfg: DaemonConfig,
    readonly log: Logger,
  ) {}

  /** The config in force: the one started with, or the last one a reload applied. */
  get config(): DaemonConfig {
    return this.cfg;
  }

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
    await prepareStateDir(c.node.stateDir);
    this.releaseLock = await acquireLock(c.node.stateDir);
    this.psk = await readPsk(c.auth.pskFile);
    for (const m of c.mirrors) this.entries.set(m.name, this.newEntry(m));
    // Secondaries first, so that a daemon holding both can receive at once.
    for (const e of this.entries.values()) if (e.config.role === 'secondary') await this.startMirror(e);
    if (c.listen) await this.listen(c.listen.host, c.listen.port);
    for (const e of this.entries.values()) if (e.config.role === 'primary') await this.startMirror(e);
    // Observed every second from here on: error transitions, cycles and the progress rate.
    const metrics = new MirrorMetrics(() => [...this.entries.values()].map((e) => ({ status: () => this.rawStatus(e) })), { node: c.node.name, version: VERSION });
    this.metrics = metrics;
    metrics.start(1000);
    const scrape = async () => ({ contentType: metrics.contentType, body: await metrics.scrape() });
    this.control = await startControlServer(c.node.stateDir, { status: () => this.status(), metrics: scrape, drills: this.drillHandlers(), roles: (name, action, o) => this.roleAction(name, action, o) });
    if (c.metrics) {
      this.metricsServer = await startMetricsServer(c.metrics.host, c.metrics.port, scrape);
      const a = this.metricsServer.address();
      this.metricsAddr = a && typeof a === 'object' ? { host: a.address, port: a.port } : { ...c.metrics };
    }
    this.log.info({ version: VERSION, mirrors: c.mirrors.length, listen: this.listenAddr, metrics: this.metricsAddr, config: c.sourcePath }, 'daemon started');
  }

  private newEntry(m: MirrorConfig): Entry {
    const log = this.log.child({ mirror: m.name });
    return {
      config: m,
      mirror: new Mirror(m, { nodeName: this.config.node.name, stateDir: this.config.node.stateDir, psk: this.psk, log, listening: this.config.listen !== undefined, ...this.throttleFor(m) }),
    };
  }

  /** Start a mirror; one that cannot start stays in the map (its status shows why; a reload tries again). */
  private async startMirror(e: Entry): Promise<void> {
    try {
      await e.mirror.start();
    } catch (err) {
      const te = asTmError(err, ErrorCodes.INTERNAL, `mirror ${e.config.name}`);
      this.log.child({ mirror: e.config.name }).error({ code: te.code }, `mirror cannot start: ${te.message}`);
    }
  }

  /** The bandwidth caps of a primary mirror as a PrimaryContext.throttle, or nothing when it has none. */
  private throttleFor(m: MirrorConfig): { throttle?: (bytes: number, signal: AbortSignal) => Promise<void> } {
    if (m.role !== 'primary' || !m.peer) return {};
    if (m.bandwidth === undefined) this.bandwidth.forgetMirror(m.name);
    const buckets = this.bandwidth.bucketsFor({
      mirror: m.name,
      ...(m.bandwidth !== undefined ? { mirrorLimit: { rate: m.bandwidth } } : {}),
      peer: peerKey(m.peer),
      ...(m.peerBandwidth !== undefined ? { peerLimit: { rate: m.peerBandwidth } } : {}),
    });
    if (buckets.length === 0) return {};
    return { throttle: (bytes, signal) => throttle(buckets, bytes, signal) };
  }

  /**
   * The listener of primaries (src/wire/transport.ts): HTTPS with mutual TLS
   * when the config has `tls:`, plain HTTP otherwise; every session it
   * accepts is served (handshake, then the mirror it names).
   */
  private async listen(host: string, port: number): Promise<void> {
    const files = this.config.tls;
    const tls = files ? await readTlsFiles(files, 'tls', { log: this.log, refusedBy: 'primaries' }) : null;
    this.listener = await listen({ host, port, tls, log: this.log, onSession: (session) => void serveSession(session, { node: this.config.node.name, psk: this.psk, log: this.log, mirror: (name) => this.entries.get(name)?.mirror }) });
    this.listenAddr = this.listener.address;
  }

  /** promote, demote, switchover, resolve through the control socket (docs/runbook.md). */
  private roleAction(name: string, action: RoleAction, o: { force: boolean; discardLocal: boolean }): Promise<RoleChangeReport> {
    const e = this.entries.get(name);
    if (!e) return Promise.reject(new TmError(ErrorCodes.UNKNOWN_MIRROR, `this node (${this.config.node.name}) has no mirror named "${name}"`));
    const m = e.mirror;
    switch (action) {
      case 'promote':
        return m.promote({ force: o.force });
      case 'demote':
        return m.demote();
      case 'switchover':
        return m.switchover();
      case 'resolve':
        return m.resolve({ discardLocal: o.discardLocal });
    }
  }

  /** The drill actions of the control socket (docs/drills.md): the named mirror's, every running secondary's for the list. */
  private drillHandlers(): DrillHandlers {
    const mirror = (name: string) => {
      const e = this.entries.get(name);
      if (!e) throw new TmError(ErrorCodes.UNKNOWN_MIRROR, `this node (${this.config.node.name}) has no mirror named "${name}"`);
      return e.mirror;
    };
    return {
      start: async (name, drill) => mirror(name).drills().start(drill),
      stop: async (name, drill, force) => mirror(name).drills().stop(drill, force),
      list: async () => [...this.entries.values()].flatMap((e) => (e.mirror.running && e.mirror.role === 'secondary' ? e.mirror.drills().list() : [])),
    };
  }

  private rawStatus(e: Entry): Promise<MirrorStatus> {
    return e.mirror.status();
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
      config: { path: this.cfg.sourcePath, loadedAt: this.configLoadedAt.toISOString(), lastReload: this.lastReload ? structuredClone(this.lastReload) : null },
      mirrors,
    };
  }

  /**
   * Apply a new config without a restart (SIGHUP): mirrors added start,
   * removed ones stop (state persisted), changed ones (any difference in their
   * resolved config, or a new pre-shared key) stop and start again, the others
   * keep running untouched. A config that changes a key only a restart can
   * change (TM_ERR_RELOAD) or whose key file cannot be read (TM_ERR_CONFIG) is
   * rejected before anything changes. Reloads run one at a time; the result is
   * kept for GET /status (`config.lastReload`).
   */
  reload(next: DaemonConfig): Promise<ReloadReport> {
    return this.enqueueReload(async () => next);
  }

  /** Read and validate `file` (default: the config's own file) when the reload's turn comes, then {@link reload} it. */
  reloadFromFile(file: string = this.cfg.sourcePath): Promise<ReloadReport> {
    return this.enqueueReload(() => loadConfig(file));
  }

  private enqueueReload(load: () => Promise<DaemonConfig>): Promise<ReloadReport> {
    const run = this.reloading.then(async () => {
      try {
        if (this.stopping) throw new TmError(ErrorCodes.ABORTED, 'the daemon is stopping; the config was not reloaded');
        const report = await this.reloadNow(await load());
        this.lastReload = { at: new Date().toISOString(), ok: true, error: null, ...report };
        return report;
      } catch (e) {
        const err = asTmError(e, ErrorCodes.INTERNAL, 'config reload');
        this.lastReload = { at: new Date().toISOString(), ok: false, error: err.toJSON(), added: [], removed: [], changed: [], unchanged: [] };
        throw err;
      }
    });
    this.reloading = run.catch(() => {});
    return run;
  }

  private async reloadNow(next: DaemonConfig): Promise<ReloadReport> {
    const old = this.cfg;
    checkReloadable(old, next);
    const psk = await readPsk(next.auth.pskFile);
    const pskChanged = !psk.equals(this.psk);
    // A mirror that could not start (volume missing...) is tried again.
    const failed = [...this.entries.values()].filter((e) => !e.mirror.running).map((e) => e.config.name);
    const diff = diffMirrors(old.mirrors, next.mirrors, { restartAll: pskChanged, restart: failed });
    const report = reportOf(diff);
    this.log.info({ config: next.sourcePath, ...report, pskChanged }, 'applying the new config');
    if (next.node.logLevel !== old.node.logLevel) this.log.level = next.node.logLevel;

    // Stop what goes away or changes, state persisted (a secondary's session is closed).
    // A removed secondary leaves the map first: a primary asking for it from now on
    // is told it is unknown here. A changed one stays (refusing while stopped) until
    // its successor runs.
    const leaving = [...diff.removed, ...diff.changed].map((m) => ({ name: m.name, e: this.entries.get(m.name) }));
    for (const m of diff.removed) this.entries.delete(m.name);
    await Promise.all(leaving.map(({ name, e }) => e?.mirror?.stop().catch((err) => this.log.error({ err, mirror: name }, 'stopping mirror failed'))));
    for (const m of diff.removed) this.bandwidth.forgetMirror(m.name);
    const cappedPeers = new Set(next.mirrors.filter((m) => m.role === 'primary' && m.peer && m.peerBandwidth !== undefined).map((m) => peerKey(m.peer!)));
    for (const m of old.mirrors) if (m.role === 'primary' && m.peer && !cappedPeers.has(peerKey(m.peer))) this.bandwidth.forgetPeer(peerKey(m.peer));
    this.psk = psk;
    this.cfg = next;
    this.configLoadedAt = new Date();

    // Start what is new or changed: secondaries first, as at start. Each entry
    // replaces the old one in one step once its mirror runs (or failed to start).
    const starting = [...diff.changed, ...diff.added];
    for (const role of ['secondary', 'primary'] as const) {
      for (const m of starting) {
        if (m.role !== role || this.stopping) continue;
        const e = this.newEntry(m);
        await this.startMirror(e);
        // (A stop() asked meanwhile waits for this reload, then stops it with the rest.)
        this.entries.set(m.name, e);
      }
    }
    // The status lists the mirrors in the new config's order.
    const ordered = new Map<string, Entry>();
    for (const m of next.mirrors) {
      const e = this.entries.get(m.name);
      if (e) ordered.set(m.name, e);
    }
    this.entries = ordered;
    for (const name of [...report.removed, ...report.changed]) void this.metrics?.forget(name);
    return report;
  }

  /** Stop every mirror, persist state, close sockets, release the lock. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      // A reload running now starts nothing more once it sees `stopping`; wait for it.
      await this.reloading;
      this.metrics?.stop();
      await Promise.all([...this.entries.values()].map((e) => e.mirror.stop().catch((err) => this.log.error({ err }, 'stopping mirror failed'))));
      await this.listener?.close();
      await new Promise((r) => (this.control ? this.control.close(r) : r(undefined)));
      this.metricsServer?.closeAllConnections();
      await new Promise((r) => (this.metricsServer ? this.metricsServer.close(r) : r(undefined)));
      await this.releaseLock?.();
      this.log.info('daemon stopped');
    })();
    return this.stopping;
  }
}
