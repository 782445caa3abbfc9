import { execFile } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, openSync, readdirSync, readFileSync, statSync, writeSync } from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { cliPath, DaemonProcess } from '../../src/cli/daemon-process.js';
import type { MirrorState } from '../../src/mirror/state.js';
import type { MirrorStatus } from '../../src/mirror/status.js';
import type { RollbackReport } from '../../src/mirror/rollback.js';
import { native } from '../../src/native/index.js';
import { prng } from '../../src/util/sample.js';
import { sha256File, type Pair } from './pair.js';

/*
 * Crash rounds for the consistency proof of issue 11 §2: a pair of real
 * daemons, a change set written to the source between generations, SIGKILL
 * at a random moment (most of them while the secondary applies), `thinmirror
 * rollback` on the stopped secondary, the target compared with the image of
 * the generation the secondary's state.json says is committed, then a restart
 * and convergence. test/integration/consistency.test.ts drives it.
 *
 * How the test knows the image of every committed generation: the primary
 * tracks in `reflink` mode (a generation's image is a FICLONE snapshot, taken
 * in one ioctl) and is frozen (SIGSTOP, every thread stopped) while a change
 * set is written, so that each snapshot sees the source before or after the
 * whole change set, never half of it. The source does not change again until
 * the round has converged. So a round that starts with both sides at
 * generation G, image h(G), can only ever commit generations above G whose
 * image is the source after the change set: the expected image of the
 * committed generation C read from state.json after the kill is h(G) when
 * C = G, the new source's when C > G (C < G is a failure in itself).
 */

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const run = promisify(execFile);

/** SIGSTOP `pid` and wait until every thread of it is stopped (a thread inside a syscall, e.g. FICLONE, stops when it returns). */
export async function freeze(pid: number, timeoutMs = 5000): Promise<void> {
  process.kill(pid, 'SIGSTOP');
  const deadline = Date.now() + timeoutMs;
  while (!allThreadsStopped(pid)) {
    if (Date.now() > deadline) throw new Error(`process ${pid} did not stop within ${timeoutMs} ms of SIGSTOP`);
    await sleep(1);
  }
}

/** Resume a process stopped by {@link freeze}. */
export function thaw(pid: number): void {
  process.kill(pid, 'SIGCONT');
}

function allThreadsStopped(pid: number): boolean {
  for (const t of readdirSync(`/proc/${pid}/task`)) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8');
    } catch {
      continue; // the thread ended meanwhile
    }
    // "pid (comm) S ...": the state is the first field after the command name, which may hold spaces.
    const state = stat[stat.lastIndexOf(')') + 2];
    if (state !== 'T' && state !== 't') return false;
  }
  return true;
}

/** What a change set did to the source (chunks: distinct chunks touched). */
export interface ChangeSet {
  chunks: number;
  dataBytes: number;
  punchedBytes: number;
  zeroedBytes: number;
}

/**
 * Change runs of 1 to 16 chunks at random places of `file` until at least
 * `chunks` distinct chunks were touched: 80% of the runs get random bytes
 * (a quarter of those over only part of the run, 4 KiB aligned: partly
 * written chunks), 10% are punched (holes: trims on the wire), 10% are
 * written with zeros (allocated zeros: zero extents on the wire).
 */
export async function writeChangeSet(file: string, size: number, chunkSize: number, chunks: number, rand: () => number): Promise<ChangeSet> {
  const total = Math.floor(size / chunkSize);
  const touched = new Set<number>();
  const out: ChangeSet = { chunks: 0, dataBytes: 0, punchedBytes: 0, zeroedBytes: 0 };
  const buf = Buffer.alloc(16 * chunkSize);
  const fd = openSync(file, 'r+');
  try {
    while (touched.size < chunks) {
      const first = Math.floor(rand() * total);
      const end = Math.min(total, first + 1 + Math.floor(rand() * 16));
      let off = first * chunkSize;
      let len = (end - first) * chunkSize;
      const r = rand();
      if (r < 0.8) {
        if (rand() < 0.25) {
          const skip = 4096 * Math.floor((rand() * chunkSize) / 4096);
          off += skip;
          len = Math.max(4096, 4096 * Math.floor((rand() * (len - skip)) / 4096));
        }
        randomFillSync(buf, 0, len);
        writeSync(fd, buf, 0, len, off);
        out.dataBytes += len;
      } else if (r < 0.9) {
        await native().punchHole(fd, off, len);
        out.punchedBytes += len;
      } else {
        buf.fill(0, 0, len);
        writeSync(fd, buf, 0, len, off);
        out.zeroedBytes += len;
      }
      for (let i = Math.floor(off / chunkSize); i < Math.ceil((off + len) / chunkSize); i++) touched.add(i);
    }
  } finally {
    closeSync(fd);
  }
  out.chunks = touched.size;
  return out;
}

export type Victim = 'secondary' | 'both' | 'primary';

export interface CrashRoundsOptions {
  /** Configs written: the primary tracks in reflink mode (source on XFS), the target is where the test wants it. */
  pair: Pair;
  /** The target file when not `pair.target` (e.g. on another loop-mounted filesystem). */
  target?: string;
  /** The consistency mode the secondary must report (consistency: auto picks it from the target's filesystem). */
  mode: 'reflink' | 'journal';
  seed: number;
  /** Added to the secondary's environment (the negative control's TM_TEST_UNSAFE_JOURNAL_ORDER). */
  secondaryEnv?: Record<string, string>;
  /** Who is killed: a mix (secondary 55%, both 25%, the primary 20% with the secondary then stopped), or always the secondary. */
  victims?: 'mixed' | 'secondary';
  /** Share of the kills timed from the moment the secondary is seen applying (default 0.85); the others fall at random after the change set. */
  targeted?: number;
  /** Share of the rounds with the secondary killed mid-apply in which it is restarted, resumes, and is killed again before the rollback (default 0.25). */
  resumed?: number;
  /** Chunks changed per round: uniform in [min, max]. */
  minChunks: number;
  maxChunks: number;
  /** Called with one line per round (progress, for a long run). */
  log?: (line: string) => void;
}

/** One round's outcome. */
export interface RoundResult {
  round: number;
  victim: Victim;
  /** The kill was timed from the secondary being seen applying (else: at random after the change set). */
  targeted: boolean;
  /** Killed mid-apply, the secondary was restarted without a rollback, resumed the generation and was killed again. */
  resumed: boolean;
  /** state.json of the stopped secondary had `applying` non-null. */
  duringApply: boolean;
  /** The generation both sides held when the round started, and the committed one in state.json after the kill. */
  before: number;
  committed: number;
  rollback: RollbackReport;
  /** sha256 of the target after rollback equals the expected image. */
  match: boolean;
  /** The rollback changed the target (it was not the committed image after the kill). */
  changed: boolean;
  expected: string;
  got: string;
  change: ChangeSet;
  ms: number;
}

/** Counts over rounds, as the test prints them. */
export interface CrashRoundsSummary {
  rounds: number;
  kills: Record<Victim, number>;
  /** Rounds with a second kill after a resume. */
  resumed: number;
  duringApply: number;
  /** Rounds whose rollback undid a generation (base cloned back or journal replayed). */
  undone: number;
  /** Rounds whose rollback changed the target's content. */
  changed: number;
  /** Data bytes written back from journals. */
  bytesRolledBack: number;
  mismatches: number;
  generation: number;
  seconds: number;
}

/** A loopback pair driven through crash rounds; {@link Pair.cleanup} still kills what runs. */
export class CrashRounds {
  readonly results: RoundResult[] = [];
  private readonly rand: () => number;
  /** Generation both sides hold between rounds, and the sha256 of its image (= the source then). */
  private generation = 0;
  private image = '';
  private logs = 0;
  private chunkSize = 0;
  /** sha256 of the source since the last change set (it changes only in {@link changeSource}). */
  private sourceHash: Promise<string> | null = null;
  /** How long applying the largest change set took in the calibration round (ms): sets the range of the untargeted kills' delay. */
  applyMs = 0;
  private readonly t0 = Date.now();

  constructor(readonly o: CrashRoundsOptions) {
    this.rand = prng(o.seed);
  }

  private get pair(): Pair {
    return this.o.pair;
  }

  private get target(): string {
    return this.o.target ?? this.o.pair.target;
  }

  private startSecondary(): DaemonProcess {
    const p = this.pair;
    p.secondary = new DaemonProcess(p.cfg.secondary, p.cfg.secondaryState, path.join(p.dir, `secondary-${this.logs++}.log`), [], this.o.secondaryEnv ?? {});
    return p.secondary;
  }

  private startPrimary(): DaemonProcess {
    const p = this.pair;
    p.primary = new DaemonProcess(p.cfg.primary, p.cfg.primaryState, path.join(p.dir, `primary-${this.logs++}.log`));
    return p.primary;
  }

  /** Start both daemons, wait for the initial sync, then time the apply of a change set of `maxChunks` (no kill). */
  async start(): Promise<void> {
    await this.startSecondary().waitReady();
    this.startPrimary();
    await this.converge(1, 120_000);
    const m = await this.pair.primaryMirror();
    if (m.trackingMode !== 'reflink') throw new Error(`the primary tracks in ${m.trackingMode} mode; the rounds need reflink (point-in-time snapshots)`);
    this.chunkSize = m.chunkSize;
    await this.changeSource(this.o.maxChunks);
    const gen = this.generation;
    await this.pair.secondary!.waitFor((s) => (s.mirrors[0]!.progress?.generation ?? 0) > gen || s.mirrors[0]!.committedGeneration > gen, 30_000, 'the calibration generation', 2);
    const t = Date.now();
    await this.pair.secondary!.waitFor((s) => s.mirrors[0]!.committedGeneration > gen, 60_000, 'the calibration generation to commit', 2);
    this.applyMs = Math.max(20, Date.now() - t);
    await this.converge(gen + 1, 60_000);
  }

  /** Restart the secondary (SIGTERM, between rounds) with `env` added to its environment from now on. */
  async setSecondaryEnv(env: Record<string, string>): Promise<void> {
    this.o.secondaryEnv = env;
    await this.pair.secondary!.stop();
    await this.startSecondary().waitFor(() => true, 15_000, 'the control socket', 20);
    await this.converge(this.generation, 60_000);
  }

  /** Freeze the primary, write a change set of `chunks` chunks (at least), thaw it. */
  private async changeSource(chunks: number): Promise<ChangeSet> {
    const pid = this.pair.primary!.pid;
    await freeze(pid);
    this.sourceHash = null;
    try {
      return await writeChangeSet(this.pair.source, statSync(this.pair.source).size, this.chunkSize, chunks, this.rand);
    } finally {
      thaw(pid);
    }
  }

  private sourceImage(): Promise<string> {
    this.sourceHash ??= sha256File(this.pair.source);
    return this.sourceHash;
  }

  /**
   * Wait until the primary is in sync at a generation >= `atLeast`, the
   * secondary holds the same committed generation with nothing applying, and
   * the target's sha256 equals the source's; then that is the round's image.
   */
  private async converge(atLeast: number, timeoutMs: number): Promise<void> {
    const p = this.pair;
    const deadline = Date.now() + timeoutMs;
    let last: { primary?: MirrorStatus; secondary?: MirrorStatus } = {};
    for (;;) {
      try {
        const [a, b] = await Promise.all([p.primaryMirror(), p.secondaryMirror()]);
        last = { primary: a, secondary: b };
        if (a.state === 'in-sync' && a.committedGeneration >= atLeast && a.generation === a.committedGeneration && b.committedGeneration === a.committedGeneration && b.progress === null) {
          const [src, dst] = await Promise.all([this.sourceImage(), sha256File(this.target)]);
          if (src === dst) {
            if (b.consistency?.mode !== this.o.mode) throw new Error(`the secondary reports consistency ${JSON.stringify(b.consistency)}, expected mode ${this.o.mode}`);
            if (b.consistency.consistentGeneration !== b.committedGeneration) throw new Error(`consistentGeneration ${b.consistency.consistentGeneration} while generation ${b.committedGeneration} is committed and nothing applies`);
            this.generation = a.committedGeneration;
            this.image = src;
            return;
          }
        }
      } catch (e) {
        if (!p.primary!.running || !p.secondary!.running) throw e;
      }
      if (Date.now() > deadline) {
        throw new Error(
          `no convergence at generation >= ${atLeast} within ${timeoutMs} ms: ${JSON.stringify(last)}\n--- primary\n${p.primary!.logTail()}\n--- secondary\n${p.secondary!.logTail()}`,
        );
      }
      await sleep(50);
    }
  }

  /** `thinmirror rollback MIRROR --config FILE --json` on the stopped secondary. */
  private async rollback(): Promise<RollbackReport> {
    const p = this.pair;
    try {
      const { stdout } = await run(process.execPath, [cliPath(), 'rollback', p.mirror, '--config', p.cfg.secondary, '--json'], { env: { ...process.env, ...this.o.secondaryEnv } });
      return JSON.parse(stdout) as RollbackReport;
    } catch (e) {
      const x = e as { stdout?: string; stderr?: string; message: string };
      throw new Error(`rollback failed: ${x.message}\n${x.stdout ?? ''}${x.stderr ?? ''}`);
    }
  }

  private secondaryState(): MirrorState {
    return JSON.parse(readFileSync(path.join(this.pair.cfg.secondaryState, this.pair.mirror, 'state.json'), 'utf8')) as MirrorState;
  }

  /** Wait until the secondary applies a generation above `before` past byte `at` (extents arrive in ascending order), or committed one. */
  private async waitApplyPast(before: number, at: number, round: number): Promise<void> {
    await this.pair.secondary!.waitFor(
      (s) => {
        const m = s.mirrors[0]!;
        return m.committedGeneration > before || (m.progress !== null && m.progress.generation > before && m.progress.doneBytes >= at);
      },
      30_000,
      `round ${round}: the apply of generation ${before + 1} past ${at}`,
      2,
    );
  }

  /** One round; returns its outcome (a mismatch is returned, not thrown: the negative control counts them). */
  async round(index: number): Promise<RoundResult> {
    const t = Date.now();
    const p = this.pair;
    const before = this.generation;
    const beforeImage = this.image;
    const { minChunks, maxChunks } = this.o;
    const marks: [string, number][] = [];
    const mark = (what: string) => marks.push([what, Date.now()]);
    const change = await this.changeSource(minChunks + Math.floor(this.rand() * (maxChunks - minChunks + 1)));

    // The moment: most kills are timed from the secondary applying the new generation.
    mark('changed');
    const targeted = this.rand() < (this.o.targeted ?? 0.85);
    let delay: number;
    if (targeted) {
      // Extents arrive in ascending order: kill once the apply passed a random offset (or committed, when the
      // offset is past the generation's last extent), a few ms later.
      await this.waitApplyPast(before, Math.floor(this.rand() * statSync(p.source).size), index);
      mark('applying');
      delay = this.rand() * 10;
    } else {
      delay = this.rand() * (2 * this.applyMs + 400);
    }
    await sleep(delay);
    mark('kill');
    const v = this.rand();
    const victim: Victim = this.o.victims === 'secondary' ? 'secondary' : v < 0.55 ? 'secondary' : v < 0.8 ? 'both' : 'primary';
    const primary = p.primary!;
    const secondary = p.secondary!;
    if (victim !== 'primary') secondary.kill('SIGKILL');
    if (victim !== 'secondary') primary.kill('SIGKILL');
    // Primary lost: the operator stops the secondary (as for a failover), then rolls back.
    if (victim === 'primary') {
      await primary.exited;
      await secondary.stop();
    }
    await Promise.all([victim === 'secondary' ? null : primary.exited, secondary.exited]);

    mark('down');
    // The primary starts again at once (its startup overlaps the rollback); it connects once the secondary is up.
    if (victim !== 'secondary') this.startPrimary();
    let st = this.secondaryState();
    let resumed = false;
    if (victim !== 'primary' && st.applying !== null && this.rand() < (this.o.resumed ?? 0.25)) {
      // Restarted without a rollback, the generation resumes from the last checkpoint over the same base
      // or journal (chunks journaled before the kill must not be journaled again), and is killed again further on.
      resumed = true;
      await this.startSecondary().waitFor(() => true, 15_000, 'the control socket', 20);
      const from = st.applying.cursor;
      await this.waitApplyPast(before, from + Math.floor(this.rand() * (statSync(p.source).size - from)), index);
      await sleep(this.rand() * 10);
      p.secondary!.kill('SIGKILL');
      await p.secondary!.exited;
      mark('killed again');
      st = this.secondaryState();
    }
    const torn = await sha256File(this.target);
    const rollback = await this.rollback();
    mark('rollback');
    const got = await sha256File(this.target);
    let expected: string;
    if (st.committedGeneration === before) expected = beforeImage;
    else if (st.committedGeneration > before) expected = await this.sourceImage();
    else throw new Error(`round ${index}: the secondary's committed generation went back from ${before} to ${st.committedGeneration}`);
    if (rollback.committedGeneration !== st.committedGeneration) {
      throw new Error(`round ${index}: rollback reports generation ${rollback.committedGeneration}, state.json said ${st.committedGeneration}`);
    }

    // Restart what is down, then both sides converge on the new source.
    await this.startSecondary().waitFor(() => true, 15_000, 'the control socket', 20);
    mark('secondary up');
    await this.converge(before + 1, 60_000);
    mark('converged');

    const r: RoundResult = {
      round: index,
      victim,
      targeted,
      resumed,
      duringApply: st.applying !== null,
      before,
      committed: st.committedGeneration,
      rollback,
      match: got === expected,
      changed: torn !== got,
      expected,
      got,
      change,
      ms: Date.now() - t,
    };
    this.results.push(r);
    this.o.log?.(
      `round ${index}: kill ${victim}${targeted ? '' : ' (random moment)'}${resumed ? ', resumed and killed again' : ''}, ${r.duringApply ? `applying ${st.applying!.generation} at ${st.applying!.cursor}` : 'not applying'}, committed ${r.committed} (was ${before}), ` +
        `rollback ${rollback.undone === null ? 'nothing to undo' : `${rollback.mode} ${rollback.bytes} B${r.changed ? '' : ' (target unchanged)'}`}, ${r.match ? 'exact' : 'MISMATCH'}, ${r.ms} ms ` +
        `(delay ${Math.round(delay)}; ${marks.map(([w, at], i) => `${w} +${at - (i ? marks[i - 1]![1] : t)}`).join(', ')})`,
    );
    return r;
  }

  summary(): CrashRoundsSummary {
    const kills: Record<Victim, number> = { secondary: 0, both: 0, primary: 0 };
    for (const r of this.results) kills[r.victim]++;
    return {
      rounds: this.results.length,
      kills,
      resumed: this.results.filter((r) => r.resumed).length,
      duringApply: this.results.filter((r) => r.duringApply).length,
      undone: this.results.filter((r) => r.rollback.undone !== null).length,
      changed: this.results.filter((r) => r.changed).length,
      bytesRolledBack: this.results.reduce((n, r) => n + r.rollback.bytes, 0),
      mismatches: this.results.filter((r) => !r.match).length,
      generation: this.generation,
      seconds: (Date.now() - this.t0) / 1000,
    };
  }
}
