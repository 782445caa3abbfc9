/**
 * Incremental case of `npm run bench` (issue 3): on a loop-mounted XFS
 * (reflink=1), a 16 GiB file with 4 GiB of text-like data is mirrored twice,
 * by a pair using `tracking.mode: scan` and by a pair using `reflink`. Then
 * 64 MiB are changed in scattered writes of 4 KiB to 1 MiB, the page cache is
 * dropped, and each primary is started once more: its first cycle finds and
 * sends that change. Printed and written as JSON: each cycle's readBytes,
 * wireBytes and duration (from `status --json` lastCycle), against the bytes of
 * the chunks the writes really touched. Both replicas are then compared with
 * the source over every allocated range.
 *
 * Root only (loop device, mount, drop_caches). Environment: TM_BENCH_INC_SIZE,
 * TM_BENCH_INC_ALLOCATED, TM_BENCH_INC_CHANGED (bytes), TM_BENCH_KEEP.
 */
import { execFileSync } from 'node:child_process';
import { promises as fsp, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DaemonProcess } from '../src/cli/daemon-process.js';
import type { CycleReport } from '../src/mirror/status.js';
import { createSampleVolume, prng } from '../src/util/sample.js';
import { formatBytes } from '../src/util/units.js';
import { SparseFileVolume } from '../src/volume/sparse-file.js';
import { mergeRanges, type ByteRange } from '../src/volume/volume.js';
import { freePort, writePairConfigs } from '../test/helpers/pair-config.js';
import { LoopFs } from '../test/helpers/xfs.js';
import { writeResult } from './results.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const CHUNK = 64 * 1024;

function dropCaches(): void {
  execFileSync('sync');
  writeFileSync('/proc/sys/vm/drop_caches', '3');
}

/** Scattered writes of 4 KiB..1 MiB until `total` bytes; returns the chunk indices touched. */
async function change(file: string, size: number, total: number, seed: number): Promise<Set<number>> {
  const rnd = prng(seed);
  const touched = new Set<number>();
  const fh = await fsp.open(file, 'r+');
  const buf = Buffer.alloc(MiB);
  let done = 0;
  while (done < total) {
    const len = Math.min(total - done, 4096 * (1 + Math.floor(rnd() * 256)));
    const off = 4096 * Math.floor((rnd() * (size - len)) / 4096);
    for (let i = 0; i < len; i++) buf[i] = 32 + Math.floor(rnd() * 90);
    await fh.write(buf, 0, len, off);
    for (let c = Math.floor(off / CHUNK); c < Math.ceil((off + len) / CHUNK); c++) touched.add(c);
    done += len;
  }
  await fh.sync();
  await fh.close();
  return touched;
}

/** Compare two sparse files over the union of their allocated ranges; the rest reads as zeros in both. */
async function sameContent(a: string, b: string): Promise<boolean> {
  const va = await SparseFileVolume.open(a, { readOnly: true });
  const vb = await SparseFileVolume.open(b, { readOnly: true });
  try {
    if (va.size !== vb.size) return false;
    const ranges: ByteRange[] = mergeRanges([...(await va.allocated()), ...(await vb.allocated())].sort((x, y) => x.offset - y.offset));
    for (const r of ranges) {
      for (let pos = r.offset; pos < r.offset + r.length; pos += 8 * MiB) {
        const n = Math.min(8 * MiB, r.offset + r.length - pos);
        if (!(await va.read(pos, n)).equals(await vb.read(pos, n))) return false;
      }
    }
    return true;
  } finally {
    await va.close();
    await vb.close();
  }
}

interface Side {
  mode: 'scan' | 'reflink';
  cfg: Awaited<ReturnType<typeof writePairConfigs>>;
  dir: string;
  target: string;
}

export async function incrementalBench(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('the incremental benchmark needs root (loop device, mount, drop_caches)');
  const size = Number(process.env.TM_BENCH_INC_SIZE ?? 16 * GiB);
  const allocated = Number(process.env.TM_BENCH_INC_ALLOCATED ?? 4 * GiB);
  const changed = Number(process.env.TM_BENCH_INC_CHANGED ?? 64 * MiB);
  const fs = await LoopFs.create('xfs', Math.ceil((3 * allocated + 2 * GiB) / GiB) * GiB);
  const daemons: DaemonProcess[] = [];
  const start = (cfg: string, state: string, log: string) => {
    const d = new DaemonProcess(cfg, state, log);
    daemons.push(d);
    return d;
  };
  try {
    const source = path.join(fs.mount, 'source.img');
    console.log(`bench incremental: ${formatBytes(size)} file with ${formatBytes(allocated)} of text-like data on a loop-mounted XFS (${fs.mount})`);
    await createSampleVolume(source, { size, allocated, extents: 512, seed: 7, content: 'text' });
    const sides: Side[] = [];
    for (const mode of ['scan', 'reflink'] as const) {
      const dir = path.join(fs.mount, mode);
      await fsp.mkdir(dir);
      const target = path.join(dir, 'target.img');
      const cfg = await writePairConfigs({ dir, mirror: `inc-${mode}`, source, target, port: await freePort(), interval: '1h', extraPrimary: { tracking: { mode, interval: '1h' } } });
      sides.push({ mode, cfg, dir, target });
    }
    // Initial syncs, one after the other.
    const secondaries: DaemonProcess[] = [];
    for (const s of sides) {
      const sec = start(s.cfg.secondary, s.cfg.secondaryState, path.join(s.dir, 'secondary.log'));
      secondaries.push(sec);
      await sec.waitReady();
      const t0 = Date.now();
      const pri = start(s.cfg.primary, s.cfg.primaryState, path.join(s.dir, 'primary-0.log'));
      const st = await pri.waitFor((x) => x.mirrors[0]!.committedGeneration >= 1 && x.mirrors[0]!.state === 'in-sync', 900_000, `initial sync (${s.mode})`, 200);
      console.log(`  initial sync with ${st.mirrors[0]!.trackingMode}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      if (st.mirrors[0]!.trackingMode !== s.mode) throw new Error(`expected tracking mode ${s.mode}, the daemon uses ${st.mirrors[0]!.trackingMode}`);
      await pri.stop();
    }
    const touched = await change(source, size, changed, 11);
    const touchedBytes = touched.size * CHUNK;
    console.log(`  changed ${formatBytes(changed)} in scattered writes: ${touched.size} chunks of 64 KiB touched (${formatBytes(touchedBytes)})`);

    const cycles: Record<string, CycleReport> = {};
    for (const s of sides) {
      dropCaches();
      const pri = start(s.cfg.primary, s.cfg.primaryState, path.join(s.dir, 'primary-1.log'));
      const st = await pri.waitFor((x) => x.mirrors[0]!.committedGeneration >= 2 && x.mirrors[0]!.state === 'in-sync', 900_000, `the cycle (${s.mode})`, 100);
      cycles[s.mode] = st.mirrors[0]!.lastCycle!;
      await pri.stop();
    }
    await Promise.all(secondaries.map((d) => d.stop()));
    const identical = { scan: await sameContent(source, sides[0]!.target), reflink: await sameContent(source, sides[1]!.target) };
    const scan = cycles.scan!;
    const reflink = cycles.reflink!;
    const result = {
      date: new Date().toISOString(),
      host: { cpus: os.cpus().length, node: process.version, fs: 'xfs (reflink=1) on a loop device' },
      volume: { sizeBytes: size, allocatedBytes: allocated, changedBytes: changed, touchedChunks: touched.size, touchedChunkBytes: touchedBytes, chunkSize: CHUNK },
      scan,
      reflink,
      identical,
      ratios: {
        reflinkReadVsTouched: reflink.readBytes / touchedBytes,
        reflinkReadVsMarked: reflink.readBytes / reflink.changedBytes,
        reflinkDurationVsScan: reflink.durationSeconds / scan.durationSeconds,
      },
      targets: { reflinkReadVsTouched: 1.1, reflinkDurationVsScan: 0.1 },
      note: 'page cache dropped before each cycle; a cycle runs from the start of detection to the secondary\'s commit',
    };
    const out = await writeResult('incremental', result);
    const row = (c: CycleReport) =>
      `marked ${formatBytes(c.changedBytes).padStart(10)}  read ${formatBytes(c.readBytes).padStart(10)}  wire ${formatBytes(c.wireBytes).padStart(10)}  ${c.durationSeconds.toFixed(2)} s`;
    console.log('');
    console.log(`one cycle after ${formatBytes(changed)} of scattered writes (${formatBytes(touchedBytes)} of chunks touched)`);
    console.log(`  scan      ${row(scan)}   identical=${identical.scan}`);
    console.log(`  reflink   ${row(reflink)}   identical=${identical.reflink}`);
    console.log(`  reflink read / touched chunks  ${result.ratios.reflinkReadVsTouched.toFixed(3)} (target <= 1.1)`);
    console.log(`  reflink duration / scan        ${result.ratios.reflinkDurationVsScan.toFixed(3)} (target <= 0.1)`);
    console.log(`results: ${out}`);
    if (!identical.scan || !identical.reflink) process.exitCode = 1;
  } finally {
    await Promise.all(daemons.map((d) => d.stop()));
    if (process.env.TM_BENCH_KEEP) console.log(`kept ${fs.mount} (unmount it and detach ${fs.device} yourself)`);
    else await fs.cleanup();
  }
}
