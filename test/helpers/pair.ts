import { promises as fsp, statSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DaemonProcess } from '../../src/cli/daemon-process.js';
import type { MirrorStatus } from '../../src/mirror/status.js';
import { freePort, sha256File, writePairConfigs, type PairOptions } from './pair-config.js';

export { sha256File };

/** Allocated bytes of a file, from stat's block count. */
export function allocatedBytes(file: string): number {
  return statSync(file).blocks * 512;
}

/**
 * A primary and a secondary daemon as child processes on loopback with real
 * config files, in a temp dir removed by {@link Pair.cleanup} (call it in
 * after/afterEach: it kills whatever is still running).
 */
export class Pair {
  primary: DaemonProcess | null = null;
  secondary: DaemonProcess | null = null;
  cfg!: Awaited<ReturnType<typeof writePairConfigs>>;
  readonly source: string;
  readonly target: string;
  private restarts = 0;

  private constructor(
    readonly dir: string,
    readonly mirror: string,
  ) {
    this.source = path.join(dir, 'source.img');
    this.target = path.join(dir, 'target.img');
  }

  /** `baseDir`: where the pair's temp dir goes (e.g. a loop-mounted XFS for reflink). */
  static async create(name = 'vm1', baseDir = os.tmpdir()): Promise<Pair> {
    const dir = await fsp.mkdtemp(path.join(baseDir, 'tm-it-'));
    return new Pair(dir, name);
  }

  async writeConfigs(o: Partial<PairOptions> = {}): Promise<void> {
    const port = await freePort();
    this.cfg = await writePairConfigs({ dir: this.dir, mirror: this.mirror, source: this.source, target: this.target, port, interval: '1s', ...o });
  }

  startSecondary(): DaemonProcess {
    this.secondary = new DaemonProcess(this.cfg.secondary, this.cfg.secondaryState, path.join(this.dir, `secondary-${this.restarts++}.log`));
    return this.secondary;
  }

  startPrimary(): DaemonProcess {
    this.primary = new DaemonProcess(this.cfg.primary, this.cfg.primaryState, path.join(this.dir, `primary-${this.restarts++}.log`));
    return this.primary;
  }

  async primaryMirror(): Promise<MirrorStatus> {
    return this.primary!.mirror(this.mirror);
  }

  async secondaryMirror(): Promise<MirrorStatus> {
    return this.secondary!.mirror(this.mirror);
  }

  /** Wait until the primary reports in-sync with at least generation `gen` committed. */
  async waitInSync(gen = 1, timeoutMs = 60_000): Promise<MirrorStatus> {
    const st = await this.primary!.waitFor(
      (s) => {
        const m = s.mirrors[0]!;
        return m.state === 'in-sync' && m.committedGeneration >= gen;
      },
      timeoutMs,
      `in-sync at generation >= ${gen}`,
    );
    return st.mirrors[0]!;
  }

  /** Poll until source and target have the same sha256 (the change source runs every second). */
  async waitConverged(timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = await this.primaryMirror();
      if (m.state === 'in-sync' && (await sha256File(this.source)) === (await sha256File(this.target))) return;
      if (Date.now() > deadline) throw new Error(`source and target did not converge within ${timeoutMs} ms; primary: ${JSON.stringify(m)}\n${this.primary!.logTail()}`);
      await new Promise((r) => setTimeout(r, 300));
    }
  }

  async cleanup(): Promise<void> {
    for (const d of [this.primary, this.secondary]) d?.kill('SIGKILL');
    await Promise.all([this.primary?.exited, this.secondary?.exited]);
    if (process.env.TM_KEEP_TEST_DIRS) console.log(`kept ${this.dir}`);
    else await fsp.rm(this.dir, { recursive: true, force: true });
  }
}
