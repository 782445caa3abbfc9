/**
 * Consistency case of `npm run bench` (issue 11 §4): on a loop-mounted XFS
 * (reflink=1), one source with `allocated` bytes of text-like data is
 * mirrored to three secondaries, with `consistency: off`, `reflink` and
 * `journal`. Then every allocated chunk of the source is overwritten, and each
 * primary is started once more: the generation it sends overwrites all of
 * them on its secondary. Measured, in the same run: how long each secondary
 * takes to apply that generation (from its log: "generation begins" to
 * "generation committed"), and the ratios to `off`; the time of `drill start` on
 * the reflink secondary (control socket), and of the FICLONE + fsync it does on a
 * 16 GiB file with 4 GiB allocated (TM_BENCH_CONS_DRILL_SIZE).
 *
 * Root only (loop device, mount, drop_caches). Environment: TM_BENCH_CONS_ALLOCATED (bytes, default 1 GiB), TM_BENCH_KEEP.
 */
import { execFileSync } from 'node:child_process';
import { promises as fsp, readFileSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DaemonProcess } from '../src/cli/daemon-process.js';
import { controlCall } from '../src/daemon/control.js';
import { native } from '../src/native/index.js';
import { sha256File } from '../src/util/sha256.js';
import { createSampleVolume, prng, textLike } from '../src/util/sample.js';
import { formatBytes } from '../src/util/units.js';
import { SparseFileVolume } from '../src/volume/sparse-file.js';
import { freePort, writePairConfigs } from '../test/helpers/pair-config.js';
import { LoopFs } from '../test/helpers/xfs.js';
import { writeResult } from './results.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const MODES = ['off', 'reflink', 'journal'] as const;
/** Issue 11's targets: apply time relative to `off`. */
const TARGETS = { reflink: 1.1, journal: 2 };

function dropCaches(): void {
  execFileSync('sync');
  writeFileSync('/proc/sys/vm/drop_caches', '3');
}

/** Seconds between "generation begins" and "generation committed" of `generation` in a secondary's pino log. */
function applySeconds(log: string, generation: number): number {
  let begun: number | null = null;
  for (const line of readFileSync(log, 'utf8').split('\n')) {
    if (!line.startsWith('{')) continue;
    const o = JSON.parse(line) as { time: number; msg: string; generation?: number };
    if (o.generation !== generation) continue;
    if (o.msg === 'generation begins' && begun === null) begun = o.time;
    if (o.msg === 'generation committed' && begun !== null) return (o.time - begun) / 1000;
  }
  throw new Error(`${log}: generation ${generation} did not begin and commit`);
}

/** Seconds to FICLONE `from` into a new file `to` and fsync it. */
async function timeClone(from: string, to: string): Promise<number> {
  const src = await fsp.open(from, 'r');
  const dst = await fsp.open(to, 'w');
  try {
    const t0 = performance.now();
    await native().ficlone(dst.fd, src.fd);
    await dst.sync();
    return (performance.now() - t0) / 1000;
  } finally {
    await src.close();
    await dst.close();
    await fsp.rm(to, { force: true });
  }
}

export async function consistencyBench(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('the consistency benchmark needs root (loop device, mount, drop_caches)');
  const allocated = Number(process.env.TM_BENCH_CONS_ALLOCATED ?? 1 * GiB);
  const size = 2 * allocated;
  const fs = await LoopFs.create('xfs', Math.ceil((6 * allocated + 2 * GiB) / GiB) * GiB + Number(process.env.TM_BENCH_CONS_DRILL_SIZE ?? 16 * GiB) / 2);
  const daemons: DaemonProcess[] = [];
  const start = (cfg: string, state: string, log: string) => {
    const d = new DaemonProcess(cfg, state, log);
    daemons.push(d);
    return d;
  };
  try {
    const source = path.join(fs.mount, 'source.img');
    console.log(`bench consistency: ${formatBytes(size)} file with ${formatBytes(allocated)} of text-like data on a loop-mounted XFS (${fs.mount})`);
    await createSampleVolume(source, { size, allocated, extents: 64, seed: 17, content: 'text' });
    const sides = [];
    for (const mode of MODES) {
      const dir = path.join(fs.mount, mode);
      await fsp.mkdir(dir);
      const target = path.join(dir, 'target.img');
      const cfg = await writePairConfigs({
        dir,
        mirror: `cons-${mode}`,
        source,
        target,
        port: await freePort(),
        interval: '1h',
        extraPrimary: { tracking: { mode: 'scan', interval: '1h' } },
        extraSecondary: { consistency: mode },
      });
      const sec = start(cfg.secondary, cfg.secondaryState, path.join(dir, 'secondary.log'));
      await sec.waitReady();
      const pri = start(cfg.primary, cfg.primaryState, path.join(dir, 'primary-0.log'));
      await pri.waitFor((x) => x.mirrors[0]!.committedGeneration >= 1 && x.mirrors[0]!.state === 'in-sync', 900_000, `initial sync (${mode})`, 200);
      await pri.stop();
      const st = await sec.status();
      const used = st.mirrors[0]!.consistency?.mode;
      if (used !== mode) throw new Error(`expected consistency ${mode}, the secondary uses ${used}`);
      sides.push({ mode, dir, target, cfg, sec });
    }
    // Overwrite every allocated byte with new data: the next generation rewrites all of it.
    const v = await SparseFileVolume.open(source);
    const rnd = prng(99);
    let overwritten = 0;
    try {
      for (const r of await v.allocated()) {
        for (let off = r.offset; off < r.offset + r.length; off += 8 * MiB) {
          const n = Math.min(8 * MiB, r.offset + r.length - off);
          await v.write(off, textLike(n, rnd));
          overwritten += n;
        }
      }
      await v.flush();
    } finally {
      await v.close();
    }
    console.log(`  overwrote ${formatBytes(overwritten)} (every allocated chunk)`);
    const want = await sha256File(source);
    const seconds: Record<string, number> = {};
    const identical: Record<string, boolean> = {};
    for (const s of sides) {
      dropCaches();
      const pri = start(s.cfg.primary, s.cfg.primaryState, path.join(s.dir, 'primary-1.log'));
      await pri.waitFor((x) => x.mirrors[0]!.committedGeneration >= 2 && x.mirrors[0]!.state === 'in-sync', 900_000, `generation 2 (${s.mode})`, 100);
      await pri.stop();
      seconds[s.mode] = applySeconds(path.join(s.dir, 'secondary.log'), 2);
      identical[s.mode] = (await sha256File(s.target)) === want;
    }
    // drill start on the reflink secondary, through its control socket (idle: it clones the target).
    const rs = sides.find((x) => x.mode === 'reflink')!;
    const t0 = performance.now();
    const started = await controlCall<{ drill: { seconds: number } }>(rs.cfg.secondaryState, 'POST', '/mirrors/cons-reflink/drills', { name: 'bench' });
    const drillStartSeconds = (performance.now() - t0) / 1000;
    await controlCall(rs.cfg.secondaryState, 'DELETE', '/mirrors/cons-reflink/drills/bench');
    await Promise.all(sides.map((s) => s.sec.stop()));
    // What drill start does, on the 16 GiB volume with 4 GiB allocated: FICLONE of the whole file, then fsync.
    const bigSize = Number(process.env.TM_BENCH_CONS_DRILL_SIZE ?? 16 * GiB);
    const big = path.join(fs.mount, 'big.img');
    await createSampleVolume(big, { size: bigSize, allocated: bigSize / 4, extents: 4096, seed: 5, content: 'text' });
    dropCaches();
    const bigClone = await timeClone(big, path.join(fs.mount, 'big.img.drill'));
    const ratios = { reflink: seconds.reflink! / seconds.off!, journal: seconds.journal! / seconds.off! };
    const result = {
      date: new Date().toISOString(),
      host: { cpus: os.cpus().length, node: process.version, fs: 'xfs (reflink=1) on a loop device' },
      volume: { sizeBytes: size, allocatedBytes: allocated, overwrittenBytes: overwritten, chunkSize: 65536 },
      applySeconds: seconds,
      applyMBps: Object.fromEntries(Object.entries(seconds).map(([k, t]) => [k, overwritten / 1e6 / t])),
      ratiosToOff: ratios,
      targets: TARGETS,
      identical,
      drillStart: { secondsThroughControlSocket: drillStartSeconds, secondsReportedByDaemon: started.drill.seconds, volume: { sizeBytes: size, allocatedBytes: allocated } },
      ficlone16GiB: { seconds: bigClone, sizeBytes: bigSize, allocatedBytes: bigSize / 4, extents: 4096 },
      note: 'apply time of the generation that overwrites every allocated chunk, from the secondary\'s log; page cache dropped before each; the three secondaries apply one after the other on the same filesystem',
    };
    const out = await writeResult('consistency', result);
    console.log('');
    console.log(`apply of one generation overwriting ${formatBytes(overwritten)}`);
    for (const m of MODES) console.log(`  ${m.padEnd(8)} ${seconds[m]!.toFixed(2).padStart(7)} s  ${(overwritten / 1e6 / seconds[m]!).toFixed(0).padStart(5)} MB/s  identical=${identical[m]}`);
    console.log(`  reflink / off  ${ratios.reflink.toFixed(2)} (target <= ${TARGETS.reflink})`);
    console.log(`  journal / off  ${ratios.journal.toFixed(2)} (target <= ${TARGETS.journal})`);
    console.log(`  drill start (reflink secondary, ${formatBytes(size)} / ${formatBytes(allocated)}, control socket) ${drillStartSeconds.toFixed(2)} s`);
    console.log(`  FICLONE + fsync of ${formatBytes(bigSize)} with ${formatBytes(bigSize / 4)} in 4096 extents (what drill start does) ${bigClone.toFixed(2)} s (target <= 2 s)`);
    console.log(`results: ${out}`);
    if (!Object.values(identical).every(Boolean)) process.exitCode = 1;
  } finally {
    await Promise.all(daemons.map((d) => d.stop()));
    if (process.env.TM_BENCH_KEEP) console.log(`kept ${fs.mount} (unmount it and detach ${fs.device} yourself)`);
    else await fs.cleanup();
  }
}
