import { collectDefaultMetrics, Counter, Gauge, Registry } from 'prom-client';
import type { MirrorStatus } from '../mirror/status.js';

/** Anything that reports one mirror's status: a Mirror, a fake in tests. */
export interface StatusProvider {
  status(): MirrorStatus | Promise<MirrorStatus>;
}

/** Every state a mirror of each role can report (src/mirror/status.ts), exported as 0/1 series. */
export const STATES: Record<MirrorStatus['role'], readonly string[]> = {
  primary: ['connecting', 'initial-sync', 'syncing', 'in-sync', 'error', 'stopped'],
  secondary: ['waiting', 'receiving', 'idle', 'error', 'stopped'],
};

/** Window over which the transfer rate of the generation in flight is averaged. */
export const RATE_WINDOW_SECONDS = 10;

export interface MetricsOptions {
  node: string;
  version: string;
  /** process_* and nodejs_* metrics of prom-client (default true). */
  defaultMetrics?: boolean;
  /** Clock in ms (tests). */
  now?: () => number;
}

type Sample = { t: number; generation: number; done: number };

/** Per-mirror memory between observations. */
interface Seen {
  totals: Map<string, number>;
  error: string | null;
  errorLabels: { mirror: string; role: string; code: string } | null;
  cycleGeneration: number | null;
  samples: Sample[];
  rate: number | null;
  /** Names of the drills exported at the last observation. */
  drills: Set<string>;
}

/**
 * Prometheus metrics of the mirrors, on a registry of its own. Each
 * observation reads every mirror's status() once and updates the metrics from
 * that one snapshot; the daemon observes every second (so that error
 * transitions and completed cycles between scrapes are seen) and once more at
 * each scrape. Lifetime counters of MirrorStatus (sentBytes, appliedBytes,
 * wireBytes) are exposed as they are; cycles and errors are counted from
 * changes between observations (docs/metrics.md says what that can miss).
 */
export class MirrorMetrics {
  readonly registry = new Registry();
  private readonly seen = new Map<string, Seen>();
  private readonly now: () => number;
  private chain: Promise<unknown> = Promise.resolve();
  private timer: NodeJS.Timeout | null = null;

  private readonly state: Gauge;
  private readonly lag: Gauge;
  private readonly dirty: Gauge;
  private readonly generation: Gauge;
  private readonly committed: Gauge;
  private readonly volumeBytes: Gauge;
  private readonly allocated: Gauge;
  private readonly progressDone: Gauge;
  private readonly progressTotal: Gauge;
  private readonly rate: Gauge;
  private readonly payload: Counter;
  private readonly applied: Counter;
  private readonly wire: Counter;
  private readonly cycles: Counter;
  private readonly cycleSeconds: Counter;
  private readonly lastCycleDuration: Gauge;
  private readonly lastCycleGeneration: Gauge;
  private readonly lastCycleChanged: Gauge;
  private readonly lastCycleWire: Gauge;
  private readonly lastCycleStep: Gauge;
  private readonly errors: Counter;
  private readonly errorNow: Gauge;
  private readonly drillCount: Gauge;
  private readonly drillAge: Gauge;
  private readonly drillGeneration: Gauge;
  private readonly splitBrain: Gauge;
  private readonly divergent: Gauge;
  private readonly codec: Gauge;
  private readonly ratio: Gauge;
  private readonly compressedPayload: Counter;
  /** Every metric labelled by mirror. */
  private readonly perMirror: (Gauge | Counter)[] = [];

  constructor(
    private readonly mirrors: () => Iterable<StatusProvider>,
    opts: MetricsOptions,
  ) {
    this.now = opts.now ?? Date.now;
    const registers = [this.registry];
    const ml = ['mirror', 'role'] as const;
    const gauge = (name: string, help: string, labelNames: readonly string[] = ml) => this.labelled(new Gauge({ name, help, labelNames, registers }));
    const counter = (name: string, help: string, labelNames: readonly string[] = ml) => this.labelled(new Counter({ name, help, labelNames, registers }));

    gauge('thinmirror_build_info', 'Always 1; the labels name the node and the thinmirror version.', ['node', 'version']).set({ node: opts.node, version: opts.version }, 1);
    this.state = gauge('thinmirror_mirror_state', 'Current state of the mirror: 1 for the state it is in, 0 for the others of its role.', [...ml, 'state']);
    this.lag = gauge('thinmirror_mirror_lag_seconds', 'Age of the replica: now minus when the view behind the last committed generation was taken (or a later pass found nothing changed); absent when unknown.');
    this.dirty = gauge('thinmirror_mirror_dirty_bytes', 'Bytes of chunks known to differ on the secondary (pending generation).');
    this.generation = gauge('thinmirror_mirror_generation', 'Latest generation created (primary) or being received (secondary).');
    this.committed = gauge('thinmirror_mirror_committed_generation', 'Latest generation committed (durable on the secondary).');
    this.volumeBytes = gauge('thinmirror_mirror_volume_bytes', 'Size of the volume.');
    this.allocated = gauge('thinmirror_mirror_allocated_bytes', 'Allocated bytes of the volume, as last mapped.');
    this.progressDone = gauge('thinmirror_mirror_progress_done_bytes', 'Bytes of the generation in flight sent and acknowledged (primary) or applied (secondary); absent when none is in flight.');
    this.progressTotal = gauge('thinmirror_mirror_progress_total_bytes', 'Bytes of the generation in flight; absent when none is in flight.');
    this.rate = gauge('thinmirror_mirror_progress_rate_bytes_per_second', `Progress of the generation in flight per second, averaged over the last ${RATE_WINDOW_SECONDS} s; absent when none is in flight or not yet measured.`);
    this.payload = counter('thinmirror_mirror_payload_bytes_total', 'Data payload bytes before compression sent by a primary since the daemon started; 0 on a secondary.');
    this.applied = counter('thinmirror_mirror_applied_bytes_total', 'Data payload bytes after decompression written to the target by a secondary since the daemon started; 0 on a primary.');
    this.wire = counter('thinmirror_mirror_wire_bytes_total', 'WebSocket frame bytes sent (primary) or received (secondary) since the daemon started.');
    this.cycles = counter('thinmirror_mirror_cycles_total', 'Completed cycles (committed generations with a cycle report) observed; cycles completing within one observation interval count once.');
    this.cycleSeconds = counter('thinmirror_mirror_cycle_duration_seconds_total', 'Sum of the durations of the cycles counted by thinmirror_mirror_cycles_total.');
    this.lastCycleDuration = gauge('thinmirror_mirror_last_cycle_duration_seconds', 'Duration of the last completed cycle, from detection to commit.');
    this.lastCycleGeneration = gauge('thinmirror_mirror_last_cycle_generation', 'Generation of the last completed cycle.');
    this.lastCycleChanged = gauge('thinmirror_mirror_last_cycle_changed_bytes', 'Bytes of changed chunks in the last completed cycle.');
    this.lastCycleWire = gauge('thinmirror_mirror_last_cycle_wire_bytes', 'WebSocket bytes of the last completed cycle.');
    this.lastCycleStep = gauge('thinmirror_mirror_last_cycle_step_seconds', 'Seconds of the last completed cycle spent in each step (status lastCycle.steps); absent when not measured.', [...ml, 'step']);
    this.errors = counter('thinmirror_errors_total', 'Errors by code: each time a mirror reports an error that differs (code or message) from what it reported at the previous observation.', [...ml, 'code']);
    this.errorNow = gauge('thinmirror_mirror_error', 'Present (value 1, labelled with the code) while the mirror reports an error.', [...ml, 'code']);
    this.drillCount = gauge('thinmirror_mirror_drills', 'Drills (writable clones of the replica) the secondary keeps; absent on a primary.');
    this.drillAge = gauge('thinmirror_drill_age_seconds', 'Seconds since the drill was started.', [...ml, 'drill']);
    this.drillGeneration = gauge('thinmirror_drill_generation', 'Committed generation whose image the drill was cloned from.', [...ml, 'drill']);
    this.splitBrain = gauge('thinmirror_mirror_split_brain', '1 while a split brain with the peer is recorded (both sides refuse until thinmirror resolve, docs/runbook.md), else 0.');
    this.divergent = gauge('thinmirror_mirror_divergent_bytes', 'Bytes this side changed that the peer never committed, kept for the reverse resync (a demoted primary); 0 when none.');
    this.codec = gauge('thinmirror_mirror_compression_codec', 'Primary: 1 for the codec data extents are prepared with now (compression auto: its choice), 0 for the other; absent on a secondary.', [...ml, 'codec']);
    this.ratio = gauge('thinmirror_mirror_compression_ratio', 'Primary: data payload bytes as sent / before compression since the daemon started (1: all raw); absent before any data.');
    this.compressedPayload = counter('thinmirror_mirror_compressed_payload_bytes_total', 'Primary: data payload bytes as sent (after compression) since the daemon started; with thinmirror_mirror_payload_bytes_total, the compression ratio over any interval.');
    if (opts.defaultMetrics ?? true) collectDefaultMetrics({ register: this.registry });
  }

  private labelled<M extends Gauge | Counter>(m: M): M {
    this.perMirror.push(m);
    return m;
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** Observe every `intervalMs` until {@link stop}; the timer does not keep the process alive. */
  start(intervalMs = 1000): void {
    if (this.timer) return;
    this.timer = setInterval(() => void this.observe().catch(() => {}), intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Read every mirror's status once and update the metrics. Observations run one at a time. */
  observe(): Promise<MirrorStatus[]> {
    const run = this.chain.then(async () => {
      const statuses = await Promise.all([...this.mirrors()].map((m) => m.status()));
      const t = this.now();
      for (const s of statuses) this.apply(s, t);
      return statuses;
    });
    this.chain = run.catch(() => {});
    return run;
  }

  /** The Prometheus text exposition, after a fresh observation. */
  async scrape(): Promise<string> {
    await this.observe();
    return this.registry.metrics();
  }

  /** Progress rate of a mirror's generation in flight (bytes/s), or null when not measured. */
  rateOf(mirror: string): number | null {
    return this.seen.get(mirror)?.rate ?? null;
  }

  /**
   * Drop every series of a mirror and what was remembered of it (a config
   * reload removed it, or restarted it: a new mirror object whose totals start
   * again from 0). Runs after the observation in progress, so that one cannot
   * bring the series back; a later observation starts afresh if it is still there.
   */
  forget(mirror: string): Promise<void> {
    const run = this.chain.then(async () => {
      this.seen.delete(mirror);
      for (const m of this.perMirror) {
        for (const v of (await m.get()).values) if (v.labels.mirror === mirror) m.remove(v.labels as Record<string, string>);
      }
    });
    this.chain = run.catch(() => {});
    return run;
  }

  private apply(s: MirrorStatus, t: number): void {
    const l = { mirror: s.name, role: s.role };
    let seen = this.seen.get(s.name);
    if (!seen) {
      seen = { totals: new Map(), error: null, errorLabels: null, cycleGeneration: null, samples: [], rate: null, drills: new Set() };
      this.seen.set(s.name, seen);
    }
    const states = STATES[s.role].includes(s.state) ? STATES[s.role] : [...STATES[s.role], s.state];
    for (const st of states) this.state.set({ ...l, state: st }, st === s.state ? 1 : 0);
    setOrRemove(this.lag, l, s.lagSeconds);
    this.dirty.set(l, s.dirtyBytes);
    this.generation.set(l, s.generation);
    this.committed.set(l, s.committedGeneration);
    this.volumeBytes.set(l, s.volumeBytes);
    this.allocated.set(l, s.allocatedBytes);
    setOrRemove(this.progressDone, l, s.progress?.doneBytes ?? null);
    setOrRemove(this.progressTotal, l, s.progress?.totalBytes ?? null);
    this.total(seen, this.payload, l, 'payload', s.sentBytes);
    this.total(seen, this.applied, l, 'applied', s.appliedBytes);
    this.total(seen, this.wire, l, 'wire', s.wireBytes);

    // Rate of the generation in flight over the last RATE_WINDOW_SECONDS.
    if (!s.progress) {
      seen.samples = [];
    } else {
      const p = s.progress;
      if (seen.samples.some((x) => x.generation !== p.generation || x.done > p.doneBytes)) seen.samples = [];
      seen.samples.push({ t, generation: p.generation, done: p.doneBytes });
      // Keep one sample at or before the window's start so the window stays full.
      while (seen.samples.length > 2 && seen.samples[1]!.t <= t - RATE_WINDOW_SECONDS * 1000) seen.samples.shift();
    }
    seen.rate = progressRate(seen.samples);
    setOrRemove(this.rate, l, seen.rate);

    const c = s.lastCycle;
    if (c) {
      if (seen.cycleGeneration !== c.generation) {
        seen.cycleGeneration = c.generation;
        this.cycles.inc(l);
        this.cycleSeconds.inc(l, c.durationSeconds);
      }
      this.lastCycleDuration.set(l, c.durationSeconds);
      this.lastCycleGeneration.set(l, c.generation);
      this.lastCycleChanged.set(l, c.changedBytes);
      this.lastCycleWire.set(l, c.wireBytes);
      for (const [step, v] of Object.entries(c.steps ?? {})) this.lastCycleStep.set({ ...l, step }, v);
    } else {
      this.cycles.inc(l, 0);
      this.cycleSeconds.inc(l, 0);
    }

    const z = s.compression;
    for (const codec of ['raw', 'lz4'] as const) setOrRemove(this.codec, { ...l, codec }, z ? (z.codec === codec ? 1 : 0) : null);
    setOrRemove(this.ratio, l, z?.ratio ?? null);
    if (z) this.total(seen, this.compressedPayload, l, 'compressedPayload', z.compressedPayloadBytes);

    this.splitBrain.set(l, s.splitBrain ? 1 : 0);
    this.divergent.set(l, s.divergence?.bytes ?? 0);

    // Drills (a secondary's): one series per drill, gone with the drill.
    setOrRemove(this.drillCount, l, s.drills ? s.drills.length : null);
    const drills = new Set((s.drills ?? []).map((d) => d.name));
    for (const name of seen.drills) {
      if (drills.has(name)) continue;
      this.drillAge.remove({ ...l, drill: name });
      this.drillGeneration.remove({ ...l, drill: name });
    }
    for (const d of s.drills ?? []) {
      this.drillAge.set({ ...l, drill: d.name }, d.ageSeconds);
      this.drillGeneration.set({ ...l, drill: d.name }, d.generation);
    }
    seen.drills = drills;

    const e = s.error;
    const key = e ? `${e.code}\n${e.message}` : null;
    if (e && key !== seen.error) this.errors.inc({ ...l, code: e.code });
    if (seen.errorLabels && seen.errorLabels.code !== e?.code) this.errorNow.remove(seen.errorLabels);
    seen.errorLabels = e ? { ...l, code: e.code } : null;
    if (seen.errorLabels) this.errorNow.set(seen.errorLabels, 1);
    seen.error = key;
  }

  /** Expose a lifetime total as a counter: add what it grew by; a total that went down restarts the series. */
  private total(seen: Seen, counter: Counter, labels: Record<string, string>, key: string, value: number): void {
    const last = seen.totals.get(key);
    if (last === undefined || value < last) {
      if (last !== undefined) counter.remove(labels);
      counter.inc(labels, value);
    } else {
      counter.inc(labels, value - last);
    }
    seen.totals.set(key, value);
  }
}

function setOrRemove(g: Gauge, labels: Record<string, string>, v: number | null): void {
  if (v === null || !Number.isFinite(v)) g.remove(labels);
  else g.set(labels, v);
}

/** Bytes per second between the first and last sample, or null below half a second of samples. */
export function progressRate(samples: readonly Sample[]): number | null {
  if (samples.length < 2) return null;
  const a = samples[0]!;
  const b = samples[samples.length - 1]!;
  const dt = (b.t - a.t) / 1000;
  return dt >= 0.5 ? (b.done - a.done) / dt : null;
}
