import { promises as fsp } from 'node:fs';

/**
 * The replica's real age measured from outside the daemons (issue 15): a
 * probe writes `Date.now()` (a float64, little-endian) into the first 8
 * bytes of the source every `writeMs`, and a sampler reads it back from the
 * replica every `sampleMs`; the replica's staleness at that moment is now
 * minus the value it holds. Each sample also carries what `lag()` (the
 * daemon's reported lag, read just before the replica) said, so that
 * `understatementSeconds` = staleness - reported lag: positive when the
 * daemon said the replica was younger than it was.
 */
export interface StalenessSample {
  /** Unix ms of the replica read. */
  at: number;
  /** Seconds the replica's image is behind the source (now - the probe value it holds). */
  stalenessSeconds: number;
  /** The lag the daemon reported just before (null: it reported none). */
  reportedSeconds: number | null;
  /** stalenessSeconds - reportedSeconds, projected to the replica read's moment (null when nothing reported). */
  understatementSeconds: number | null;
}

export class StalenessProbe {
  readonly samples: StalenessSample[] = [];
  private src: fsp.FileHandle | null = null;
  private writer: NodeJS.Timeout | null = null;
  private sampling: Promise<void> | null = null;
  private stopped = false;
  private readonly buf = Buffer.alloc(8);
  /** Failures of the probe's own I/O (a replica file briefly missing, a status call that timed out). */
  errors = 0;

  constructor(
    private readonly source: string,
    private readonly replica: string,
    /** The daemon's reported lag in seconds, now (null: none). */
    private readonly lag: () => Promise<number | null>,
    private readonly o: { writeMs?: number; sampleMs?: number } = {},
  ) {}

  get writeMs(): number {
    return this.o.writeMs ?? 100;
  }

  get sampleMs(): number {
    return this.o.sampleMs ?? 500;
  }

  /** Write one probe value now and keep writing every `writeMs`. */
  async start(): Promise<void> {
    this.src = await fsp.open(this.source, 'r+');
    await this.write();
    this.writer = setInterval(() => void this.write(), this.writeMs);
    this.sampling = this.sampleLoop();
  }

  private async write(): Promise<void> {
    if (!this.src || this.stopped) return;
    const b = Buffer.alloc(8);
    b.writeDoubleLE(Date.now());
    await this.src.write(b, 0, 8, 0).catch(() => void this.errors++);
  }

  /** The probe value the replica holds now (NaN when it holds none yet). */
  async readReplica(): Promise<number> {
    const fh = await fsp.open(this.replica, 'r');
    try {
      await fh.read(this.buf, 0, 8, 0);
      return this.buf.readDoubleLE(0);
    } finally {
      await fh.close();
    }
  }

  private async sampleLoop(): Promise<void> {
    while (!this.stopped) {
      const next = Date.now() + this.sampleMs;
      try {
        const t0 = Date.now();
        const reported = await this.lag();
        const v = await this.readReplica();
        const at = Date.now();
        if (Number.isFinite(v) && v > 1e12) {
          const staleness = (at - v) / 1000;
          // The reported lag was an age at t0; by the replica read it is (at - t0) older.
          const projected = reported === null ? null : reported + (at - t0) / 1000;
          this.samples.push({ at, stalenessSeconds: staleness, reportedSeconds: reported, understatementSeconds: projected === null ? null : staleness - projected });
        }
      } catch {
        this.errors++;
      }
      await new Promise((r) => setTimeout(r, Math.max(0, next - Date.now())));
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.writer) clearInterval(this.writer);
    await this.sampling;
    await this.src?.close();
    this.src = null;
  }
}

/** The q-quantile (0..1) of `xs` (nearest rank); NaN when empty. */
export function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}

/** Least-squares slope of y over x (NaN with fewer than 2 points). */
export function slope(xs: number[], ys: number[]): number {
  const n = xs.length;
  if (n < 2) return NaN;
  const mx = xs.reduce((a, b) => a + b, 0) / n;
  const my = ys.reduce((a, b) => a + b, 0) / n;
  let num = 0;
  let den = 0;
  for (let i = 0; i < n; i++) {
    num += (xs[i]! - mx) * (ys[i]! - my);
    den += (xs[i]! - mx) ** 2;
  }
  return den === 0 ? NaN : num / den;
}
