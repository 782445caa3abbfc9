/**
 * RPO case of `npm run bench` (issue 15): the replica's real age under
 * sustained random writes. A 1 GiB file on a loop-mounted XFS (reflink=1) is
 * mirrored with `tracking.mode: auto` (reflink) and `interval: 1s`; after
 * the initial sync, fio writes random 4-64 KiB blocks at 50 MB/s for 90 s
 * (TM_BENCH_RPO_SECONDS=600 for the 10-minute run) while a probe writes
 * Date.now() into the source's first 8 bytes every 100 ms and reads it back
 * from the replica twice a second (test/helpers/staleness.ts).
 *
 * Reported: the real staleness p50/p99/max, the reported `lagSeconds` against
 * it (the largest understatement), every cycle's step times (from the
 * primary's log: each commit logs its `lastCycle`), the trend of the cycle's
 * duration (least-squares slope, seconds per minute), the source's extent
 * count (`filefrag`) at the end, and the replica compared with the source.
 *
 * Root only (loop device, mount). Needs fio (Debian package fio) and filefrag
 * (e2fsprogs). Environment: TM_BENCH_RPO_SECONDS, TM_BENCH_RPO_RATE (fio
 * --rate, default 50m), TM_BENCH_RPO_SIZE (bytes, default 1 GiB), TM_BENCH_RPO_CHUNK
 * (the mirror's chunkSize, default 64KiB), TM_BENCH_RPO_SECONDARY (JSON merged into
 * the secondary's mirror config, e.g. {"checkpoint":{"bytes":"1GiB"}}), TM_BENCH_RPO_FS (xfs, the
 * default, or btrfs: the same run on a loop-mounted btrfs, whose FICLONE
 * costs a fraction of XFS's per extent; needs btrfs-progs), TM_BENCH_KEEP.
 */
import { execFileSync, spawn } from 'node:child_process';
import { promises as fsp, readFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DaemonProcess } from '../src/cli/daemon-process.js';
import type { CycleReport } from '../src/mirror/status.js';
import { formatBytes } from '../src/util/units.js';
import { freePort, writePairConfigs } from '../test/helpers/pair-config.js';
import { quantile, slope, StalenessProbe } from '../test/helpers/staleness.js';
import { LoopFs, requireTool } from '../test/helpers/xfs.js';
import { writeResult } from './results.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
/** Issue 15's targets. */
const TARGETS = { stalenessP99Seconds: 2, maxUnderstatementSeconds: 1, durationSlopeSecondsPerMinute: 0 };

/** Extents of a file as `filefrag` counts them. */
export function extentCount(file: string): number {
  const out = execFileSync('filefrag', [file], { encoding: 'utf8' });
  const m = /(\d+) extents? found/.exec(out);
  return m ? Number(m[1]) : NaN;
}

/** Run fio to the end; resolves with its JSON report's write figures. */
function fio(args: string[]): Promise<{ bytes: number; seconds: number }> {
  return new Promise((resolve, reject) => {
    const p = spawn('fio', [...args, '--output-format=json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.on('error', reject);
    p.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`fio ${args.join(' ')} exited with ${code}: ${err}`));
      try {
        const j = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: { write: { io_bytes: number; runtime: number } }[] };
        const w = j.jobs[0]!.write;
        resolve({ bytes: w.io_bytes, seconds: w.runtime / 1000 });
      } catch (e) {
        reject(new Error(`fio's report: ${(e as Error).message}`));
      }
    });
  });
}

interface LoggedCycle extends Omit<CycleReport, 'steps'> {
  /** Unix ms of the commit. */
  at: number;
  /** Seconds per step of the cycle (absent before issue 15). */
  steps?: Record<string, number>;
}

/** Every commit the primary logged with its cycle report, in order. */
function cyclesFromLog(file: string): LoggedCycle[] {
  const out: LoggedCycle[] = [];
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    if (!line.includes('generation committed by the secondary')) continue;
    try {
      const j = JSON.parse(line) as { time: number; lastCycle?: (CycleReport & { steps?: Record<string, number> }) | null };
      if (j.lastCycle) out.push({ ...j.lastCycle, at: j.time });
    } catch {
      /* a line cut by the stop */
    }
  }
  return out;
}

function stats(xs: number[]): { p50: number; p99: number; max: number; mean: number } {
  return { p50: quantile(xs, 0.5), p99: quantile(xs, 0.99), max: xs.length ? Math.max(...xs) : NaN, mean: xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN };
}

export async function rpoBench(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('the RPO benchmark needs root (loop device, mount)');
  requireTool('fio', 'fio');
  requireTool('filefrag', 'e2fsprogs');
  const seconds = Number(process.env.TM_BENCH_RPO_SECONDS ?? 90);
  const rate = process.env.TM_BENCH_RPO_RATE ?? '50m';
  const size = Number(process.env.TM_BENCH_RPO_SIZE ?? GiB);
  const fsType = process.env.TM_BENCH_RPO_FS ?? 'xfs';
  if (fsType !== 'xfs' && fsType !== 'btrfs') throw new Error(`TM_BENCH_RPO_FS=${fsType}: expected xfs or btrfs`);
  const fsName = fsType === 'xfs' ? 'XFS' : 'btrfs';
  // btrfs keeps a whole extent while any part of it is shared, so random rewrites under snapshots take more room than on XFS.
  const fs = await LoopFs.create(fsType, (fsType === 'btrfs' ? 16 : 4) * size + 2 * GiB);
  const daemons: DaemonProcess[] = [];
  let probe: StalenessProbe | null = null;
  try {
    const source = path.join(fs.mount, 'source.img');
    const dir = path.join(fs.mount, 'pair');
    await fsp.mkdir(dir);
    const target = path.join(dir, 'target.img');
    console.log(`bench rpo: ${formatBytes(size)} file on a loop-mounted ${fsName} (${fs.mount}), tracking auto, interval 1s; fio random 4-64 KiB writes at ${rate}B/s for ${seconds} s`);
    // The whole file written once (random bytes), as a VM image in use would be.
    await fio(['--name=fill', `--filename=${source}`, '--rw=write', '--bs=1m', `--size=${size}`, '--end_fsync=1']);
    const chunkSize = process.env.TM_BENCH_RPO_CHUNK ?? '64KiB';
    // More settings of the secondary's mirror, as JSON (e.g. {"checkpoint":{"bytes":"1GiB"}}).
    const secondaryExtra = process.env.TM_BENCH_RPO_SECONDARY ? (JSON.parse(process.env.TM_BENCH_RPO_SECONDARY) as Record<string, unknown>) : {};
    const cfg = await writePairConfigs({ dir, mirror: 'rpo', source, target, port: await freePort(), interval: '1s', chunkSize, extraPrimary: { tracking: { mode: 'auto', interval: '1s' } }, extraSecondary: { chunkSize, ...secondaryExtra } });
    const secondary = new DaemonProcess(cfg.secondary, cfg.secondaryState, path.join(dir, 'secondary.log'));
    daemons.push(secondary);
    await secondary.waitReady();
    const primaryLog = path.join(dir, 'primary.log');
    const primary = new DaemonProcess(cfg.primary, cfg.primaryState, primaryLog);
    daemons.push(primary);
    const t0 = Date.now();
    const st = await primary.waitFor((x) => x.mirrors[0]!.committedGeneration >= 1 && x.mirrors[0]!.state === 'in-sync', 600_000, 'the initial sync', 200);
    const mode = st.mirrors[0]!.trackingMode;
    console.log(`  initial sync with ${mode}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    if (mode !== 'reflink') throw new Error(`expected tracking mode reflink (auto on ${fsName}), the daemon uses ${mode}`);
    const extentsBefore = extentCount(source);

    probe = new StalenessProbe(source, target, async () => (await primary.mirror('rpo')).lagSeconds);
    const secondaryLag: { at: number; seconds: number | null }[] = [];
    await probe.start();
    const startedAt = Date.now();
    let stopSecondary = false;
    const secLoop = (async () => {
      while (!stopSecondary) {
        try {
          secondaryLag.push({ at: Date.now(), seconds: (await secondary.mirror('rpo')).lagSeconds });
        } catch {
          /* status busy */
        }
        await new Promise((r) => setTimeout(r, 1000));
      }
    })();
    const written = await fio([
      '--name=rpo',
      `--filename=${source}`,
      '--rw=randwrite',
      '--bssplit=4k/20:8k/20:16k/20:32k/20:64k/20',
      `--rate=${rate}`,
      '--ioengine=psync',
      '--norandommap',
      '--randrepeat=0',
      // The first MiB is left to the probe.
      `--offset=${MiB}`,
      `--size=${size - MiB}`,
      '--time_based',
      `--runtime=${seconds}`,
    ]);
    const fioEnd = Date.now();
    await probe.stop();
    stopSecondary = true;
    await secLoop;
    const extentsAfter = extentCount(source);
    // Catch up: a last probe value, written after every other write, must reach the replica, and its generation be committed.
    const marker = Date.now();
    const mb = Buffer.alloc(8);
    mb.writeDoubleLE(marker);
    const fh = await fsp.open(source, 'r+');
    await fh.write(mb, 0, 8, 0);
    await fh.close();
    const caughtUpBy = Date.now() + 300_000;
    while (Date.now() < caughtUpBy && (await probe.readReplica()) !== marker) await new Promise((r) => setTimeout(r, 200));
    const catchUpSeconds = (Date.now() - marker) / 1000;
    await primary.waitFor((x) => x.mirrors[0]!.committedGeneration === x.mirrors[0]!.generation, 300_000, 'the last generation committed', 200);
    await primary.stop();
    await secondary.stop();
    let identical = true;
    try {
      execFileSync('cmp', ['-s', source, target], { stdio: 'ignore' });
    } catch {
      identical = false;
    }

    const samples = probe.samples;
    const stale = samples.map((s) => s.stalenessSeconds);
    const under = samples.flatMap((s) => (s.understatementSeconds === null ? [] : [s.understatementSeconds]));
    const cycles = cyclesFromLog(primaryLog).filter((c) => c.at >= startedAt && c.at <= fioEnd + 1000);
    const durations = cycles.map((c) => c.durationSeconds);
    const trend = slope(
      cycles.map((c) => (c.at - startedAt) / 60_000),
      durations,
    );
    const stepNames = cycles.length && cycles[0]!.steps ? Object.keys(cycles[0]!.steps) : [];
    const steps = Object.fromEntries(stepNames.map((k) => [k, stats(cycles.map((c) => c.steps?.[k] ?? 0))]));
    const stepTrend = Object.fromEntries(stepNames.map((k) => [k, slope(cycles.map((c) => (c.at - startedAt) / 60_000), cycles.map((c) => c.steps?.[k] ?? 0))]));
    const secLags = secondaryLag.flatMap((x) => (x.seconds === null ? [] : [x.seconds]));
    const result = {
      date: new Date().toISOString(),
      commit: execFileSync('git', ['rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim(),
      host: { cpus: os.cpus().length, node: process.version, kernel: os.release(), fs: fsType === 'xfs' ? 'xfs (reflink=1) on a loop device' : 'btrfs on a loop device', shared: 'taken on a shared 2-CPU machine while other work may have run' },
      workload: { sizeBytes: size, chunkSize, seconds, rate, fioWrittenBytes: written.bytes, fioSeconds: written.seconds, fioMBps: written.bytes / 1e6 / written.seconds, probeWriteMs: probe.writeMs, sampleMs: probe.sampleMs },
      staleness: { samples: stale.length, ...stats(stale) },
      understatement: { samples: under.length, max: under.length ? Math.max(...under) : NaN, p99: quantile(under, 0.99), overSampling: under.filter((u) => u > probe!.sampleMs / 1000).length },
      reportedLag: stats(samples.flatMap((s) => (s.reportedSeconds === null ? [] : [s.reportedSeconds]))),
      secondaryLag: { samples: secLags.length, reported: secondaryLag.length, ...stats(secLags) },
      cycles: {
        count: cycles.length,
        duration: stats(durations),
        durationSlopeSecondsPerMinute: trend,
        firstTenMeanSeconds: stats(durations.slice(0, 10)).mean,
        lastTenMeanSeconds: stats(durations.slice(-10)).mean,
        changedBytes: stats(cycles.map((c) => c.changedBytes)),
        steps,
        stepSlopeSecondsPerMinute: stepTrend,
        each: cycles,
      },
      extents: { before: extentsBefore, after: extentsAfter },
      identicalAfterCatchUp: identical,
      catchUpSeconds,
      probeErrors: probe.errors,
      targets: TARGETS,
    };
    const out = await writeResult('rpo', result);
    const f = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : 'n/a');
    console.log('');
    console.log(`rpo: fio wrote ${formatBytes(written.bytes)} in ${written.seconds.toFixed(0)} s (${result.workload.fioMBps.toFixed(1)} MB/s)`);
    console.log(`  real staleness   p50 ${f(result.staleness.p50)} s  p99 ${f(result.staleness.p99)} s  max ${f(result.staleness.max)} s  (${stale.length} samples; target p99 <= ${TARGETS.stalenessP99Seconds} s)`);
    console.log(`  reported lag     p50 ${f(result.reportedLag.p50)} s  p99 ${f(result.reportedLag.p99)} s  max ${f(result.reportedLag.max)} s`);
    console.log(`  understatement   max ${f(result.understatement.max)} s  (target <= ${TARGETS.maxUnderstatementSeconds} s)`);
    console.log(`  secondary lag    ${secLags.length}/${secondaryLag.length} reported, p50 ${f(result.secondaryLag.p50)} s  max ${f(result.secondaryLag.max)} s`);
    console.log(`  cycles           ${cycles.length}, duration p50 ${f(result.cycles.duration.p50)} s  max ${f(result.cycles.duration.max)} s, first ten ${f(result.cycles.firstTenMeanSeconds)} s, last ten ${f(result.cycles.lastTenMeanSeconds)} s, slope ${f(trend)} s/min`);
    for (const k of stepNames) console.log(`    ${k.padEnd(10)} p50 ${f(steps[k]!.p50)} s  max ${f(steps[k]!.max)} s  slope ${f(stepTrend[k]!)} s/min`);
    console.log(`  extents          ${extentsBefore} before, ${extentsAfter} after (filefrag)`);
    console.log(`  replica identical after catching up (${catchUpSeconds.toFixed(1)} s): ${identical}`);
    console.log(`results: ${out}`);
    if (!identical) process.exitCode = 1;
  } finally {
    await probe?.stop().catch(() => {});
    await Promise.all(daemons.map((d) => d.stop()));
    if (process.env.TM_BENCH_KEEP) console.log(`kept ${fs.mount} (unmount it and detach ${fs.device} yourself)`);
    else await fs.cleanup();
  }
}
