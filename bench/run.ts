/**
 * `npm run bench`: first the link case (bench/link.ts, issue 13 §2): the
 * initial sync of two 4 GiB sparse files with 1 GiB allocated in scattered
 * extents, text-like and random, compared in the same run on the same data
 * with `nbdcopy --flush` between two `nbdkit file` servers, `cp
 * --sparse=always` and `rsync --sparse` (each then fsync) and the stripped ws
 * pipeline (bench/stripped.ts, the transport's ceiling) on loopback; then
 * across a veth pair between two network namespaces, shaped to 1 Gbit/s by a
 * tbf on the primary's side (root), with nbdcopy across the same link. It
 * prints thinmirror / stripped and thinmirror / nbdcopy per data set, the
 * shaped rate against the measured link rate, each daemon's peak RSS and CPU
 * seconds per GiB, and checks every copy identical. Its own variables:
 * TM_BENCH_LINK_DATA (text,random), TM_BENCH_LINK_CASE (loopback,shaped),
 * TM_BENCH_LINK_RUNS (thinmirror,stripped,nbdcopy,cp,rsync), TM_BENCH_LINK_MBIT,
 * TM_BENCH_COMPRESSION (auto|lz4|off, the primary's `compression:`).
 *
 * TM_BENCH_ONLY=initial (not in the default run, superseded by the link
 * case): the first-mirror issue's initial sync of the text-like file against
 * `cp --sparse=always` alone, with the payload codec's own cost and the
 * allocation map of a 1 TiB file against filefrag.
 *
 * Then the incremental case (bench/incremental.ts): one scan cycle and one
 * reflink cycle on the same change, on a loop-mounted XFS; and the bandwidth
 * case (bench/bandwidth.ts): measured rate against a per-mirror and a per-peer cap.
 *
 * Then the consistency case (bench/consistency.ts): the apply time of a generation overwriting every
 * allocated chunk with consistency off, reflink and journal.
 *
 * Then the frame MAC case (bench/frame-mac.ts): the per-frame MAC's throughput
 * (GMAC as sessions compute it, beside createCipheriv and HMAC-SHA256) and
 * 1 MiB data extents between two Sessions with and without it.
 * Then the event-loop case (bench/eventloop.ts): the secondary's event-loop delay p99 during the
 * initial sync of a volume with a million allocated extents.
 *
 * Then the RPO case (bench/rpo.ts): the replica's real staleness and the reported lag under 50 MB/s
 * of random writes on a loop-mounted XFS with reflink tracking, with each cycle's step times.
 *
 * Environment: TM_BENCH_ONLY (link | initial | incremental | bandwidth | consistency | mac | eventloop | rpo), TM_BENCH_DIR (work directory, default os.tmpdir()),
 * TM_BENCH_SIZE / TM_BENCH_ALLOCATED (bytes, defaults 4 GiB / 1 GiB).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { promises as fsp, statSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DaemonProcess } from '../src/cli/daemon-process.js';
import { createSampleVolume, prng } from '../src/util/sample.js';
import { describeMap } from '../src/volume/map.js';
import { formatBytes } from '../src/util/units.js';
import { freePort, sha256File, startPair, writePairConfigs } from '../test/helpers/pair-config.js';
import { codecFloor } from './codec-floor.js';
import { cpuSeconds, peakRssBytes, writeResult } from './results.js';

const GiB = 1024 ** 3;
/** Issue 2's targets for the initial sync. */
const TARGETS = { throughputVsCp: 0.8, wireRatio: 0.4, peakRssBytes: 200 * 1024 * 1024 };

function timeCommand(cmd: string, args: string[]): number {
  const t = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { stdio: 'inherit' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed with status ${r.status}`);
  return Number(process.hrtime.bigint() - t) / 1e9;
}

/**
 * Allocation map of a 1 TiB sparse file with 300 extents of 4 KiB..1 MiB:
 * `describeMap` (SEEK_DATA/SEEK_HOLE) against `filefrag -e` (FIEMAP) on the same file.
 */
async function mapBench(dir: string) {
  const file = path.join(dir, 'map-1TiB.img');
  const size = 1024 * GiB;
  const rnd = prng(5);
  const fh = await fsp.open(file, 'w');
  try {
    await fh.truncate(size);
    const slot = size / 300;
    for (let i = 0; i < 300; i++) {
      const len = 4096 * (1 + Math.floor(rnd() * 256));
      const off = Math.floor((i * slot + rnd() * (slot - len)) / 4096) * 4096;
      await fh.write(Buffer.alloc(len, 0x5a), 0, len, off);
    }
  } finally {
    await fh.close();
  }
  const runs: number[] = [];
  let extents = 0;
  for (let i = 0; i < 5; i++) {
    const t = process.hrtime.bigint();
    const m = await describeMap(file, 64 * 1024);
    runs.push(Number(process.hrtime.bigint() - t) / 1e9);
    extents = m.extents.length;
  }
  let filefragSeconds: number | null = null;
  const which = spawnSync('sh', ['-c', 'command -v filefrag']);
  if (which.status === 0) {
    const t = process.hrtime.bigint();
    spawnSync('filefrag', ['-e', file], { stdio: 'ignore' });
    filefragSeconds = Number(process.hrtime.bigint() - t) / 1e9;
  } else {
    console.log('  (filefrag not found: apt-get install e2fsprogs to compare)');
  }
  await fsp.rm(file);
  const best = Math.min(...runs);
  console.log(`map of a 1 TiB sparse file with 300 written extents: ${extents} chunk-aligned extents in ${(best * 1000).toFixed(1)} ms (best of 5; first ${(runs[0]! * 1000).toFixed(1)} ms); filefrag -e: ${filefragSeconds === null ? 'n/a' : `${(filefragSeconds * 1000).toFixed(1)} ms (process included)`}`);
  return { sizeBytes: size, writtenExtents: 300, mapExtents: extents, seconds: best, firstSeconds: runs[0], peer: { command: 'filefrag -e', seconds: filefragSeconds } };
}

async function main(): Promise<void> {
  const size = Number(process.env.TM_BENCH_SIZE ?? 4 * GiB);
  const allocated = Number(process.env.TM_BENCH_ALLOCATED ?? 1 * GiB);
  const base = process.env.TM_BENCH_DIR ?? os.tmpdir();
  const dir = await fsp.mkdtemp(path.join(base, 'tm-bench-'));
  const daemons: DaemonProcess[] = [];
  try {
    const map = await mapBench(dir);
    const source = path.join(dir, 'source.img');
    const target = path.join(dir, 'target.img');
    const cpTarget = path.join(dir, 'cp-copy.img');
    console.log(`bench: creating ${formatBytes(size)} sparse file with ${formatBytes(allocated)} of text-like data in 512 extents (${dir})`);
    await createSampleVolume(source, { size, allocated, extents: 512, seed: 42, content: 'text' });
    const srcAlloc = statSync(source).blocks * 512;

    // The peer: cp --sparse=always, the source warm in the page cache for both runs.
    const cpSeconds = timeCommand('cp', ['--sparse=always', source, cpTarget]);
    const cpSyncSeconds = cpSeconds + timeCommand('sync', ['-d', cpTarget]);
    const cpAlloc = statSync(cpTarget).blocks * 512;
    await fsp.rm(cpTarget);
    execFileSync('sync');
    const floor = await codecFloor(source, TARGETS.wireRatio);

    const port = await freePort();
    const extra = process.env.TM_BENCH_PRIMARY_EXTRA ? (JSON.parse(process.env.TM_BENCH_PRIMARY_EXTRA) as Record<string, unknown>) : undefined;
    const extraS = process.env.TM_BENCH_SECONDARY_EXTRA ? (JSON.parse(process.env.TM_BENCH_SECONDARY_EXTRA) as Record<string, unknown>) : undefined;
    const cfg = await writePairConfigs({ dir, mirror: 'bench', source, target, port, interval: '1h', extraPrimary: extra, extraSecondary: extraS });
    const { secondary, primary, t0 } = await startPair(cfg, dir, daemons);
    let lastPrint = 0;
    const st = await primary.waitFor(
      (s) => {
        const m = s.mirrors[0]!;
        if (m.error) throw new Error(`mirror failed: ${m.error.code}: ${m.error.message}`);
        if (m.progress && Date.now() - lastPrint > 2000) {
          lastPrint = Date.now();
          console.log(`  sync ${((100 * m.progress.doneBytes) / m.progress.totalBytes).toFixed(0)}%  ${formatBytes(m.sentBytes)} sent`);
        }
        return m.committedGeneration >= 1 && m.state === 'in-sync';
      },
      600_000,
      'the initial sync',
      25,
    );
    const syncSeconds = (performance.now() - t0) / 1000;
    const m = st.mirrors[0]!;
    const rssPrimary = peakRssBytes(primary.pid);
    const rssSecondary = peakRssBytes(secondary.pid);
    const cpuPrimary = cpuSeconds(primary.pid);
    const cpuSecondary = cpuSeconds(secondary.pid);
    await Promise.all(daemons.map((d) => d.stop()));
    const identical = (await sha256File(source)) === (await sha256File(target));
    const tgtAlloc = statSync(target).blocks * 512;

    const result = {
      date: new Date().toISOString(),
      host: { cpus: os.cpus().length, model: os.cpus()[0]?.model, node: process.version, fs: spawnSync('findmnt', ['-n', '-o', 'FSTYPE', '-T', dir]).stdout?.toString().trim() },
      volume: { sizeBytes: size, allocatedBytes: srcAlloc, extents: 512, content: 'text-like' },
      thinmirror: {
        seconds: syncSeconds,
        allocatedMBps: srcAlloc / 1e6 / syncSeconds,
        payloadBytes: m.sentBytes,
        wireBytes: m.wireBytes,
        wireRatio: m.wireBytes / srcAlloc,
        peakRssPrimaryBytes: rssPrimary,
        peakRssSecondaryBytes: rssSecondary,
        cpuSecondsPrimary: cpuPrimary,
        cpuSecondsSecondary: cpuSecondary,
        targetAllocatedBytes: tgtAlloc,
        identical,
        note: 'time from starting the primary process to generation 1 committed (includes process start, handshake and the final fdatasync)',
      },
      peer: {
        command: 'cp --sparse=always',
        seconds: cpSeconds,
        allocatedMBps: srcAlloc / 1e6 / cpSeconds,
        secondsWithFsync: cpSyncSeconds,
        allocatedMBpsWithFsync: srcAlloc / 1e6 / cpSyncSeconds,
        targetAllocatedBytes: cpAlloc,
      },
      map,
      codecFloor: {
        ...floor,
        note: 'one CPU, one 1 MiB piece at a time, data already in memory: lz4 compress + CRC-32C, lz4 decompress + CRC-32C, SHA-256 per 64 KiB; ceilingMBps = bytes / (mustCompress * (compress + decompress) / cpus): the most any pipeline that meets wire <= 0.4 can reach here, before reading, writing, hashing and sending',
        neededForTargetMBps: (TARGETS.throughputVsCp * srcAlloc) / 1e6 / cpSeconds,
        // The mirror must also read and write every byte, which is all cp does (single-threaded, page cache to page cache).
        ceilingWithCopyMBps: floor.bytes / 1e6 / ((floor.mustCompress * (floor.compressSeconds + floor.decompressSeconds) + cpSeconds) / floor.cpus),
      },
      ratios: {
        throughputVsCp: cpSeconds / syncSeconds,
        throughputVsCpWithFsync: cpSyncSeconds / syncSeconds,
      },
      targets: TARGETS,
    };
    const out = await writeResult('initial-sync', result);

    const mb = (x: number) => `${x.toFixed(0)} MB/s`;
    console.log('');
    console.log(`initial sync of ${formatBytes(size)} with ${formatBytes(srcAlloc)} allocated (text-like, 512 extents)`);
    console.log(`  thinmirror            ${syncSeconds.toFixed(2)} s  ${mb(result.thinmirror.allocatedMBps)} of allocated data   identical=${identical}`);
    console.log(`  cp --sparse=always    ${cpSeconds.toFixed(2)} s  ${mb(result.peer.allocatedMBps)}   (with fdatasync ${cpSyncSeconds.toFixed(2)} s, ${mb(result.peer.allocatedMBpsWithFsync)})`);
    console.log(`  throughput vs cp      ${result.ratios.throughputVsCp.toFixed(2)} x (vs cp+fdatasync ${result.ratios.throughputVsCpWithFsync.toFixed(2)} x; target >= 0.8)`);
    console.log(`  wire / allocated      ${result.thinmirror.wireRatio.toFixed(3)} (${formatBytes(m.wireBytes)} for ${formatBytes(srcAlloc)}; target <= 0.4)`);
    console.log(`  peak RSS              primary ${formatBytes(rssPrimary)}, secondary ${formatBytes(rssSecondary)} (target <= 200 MiB each)`);
    console.log(`  CPU                   primary ${cpuPrimary.toFixed(2)} s, secondary ${cpuSecondary.toFixed(2)} s (user+system, 2 cores shared by both)`);
    console.log(`  target allocated      ${formatBytes(tgtAlloc)} (cp: ${formatBytes(cpAlloc)})`);
    console.log(
      `  codec alone, 1 CPU    lz4+CRC-32C compress ${floor.compressSeconds.toFixed(2)} s, decompress ${floor.decompressSeconds.toFixed(2)} s, SHA-256 digests ${floor.sha256Seconds.toFixed(2)} s` +
        ` for ${formatBytes(floor.bytes)} (lz4 ratio ${floor.wireRatio.toFixed(3)})`,
    );
    console.log(
      `  ceiling on ${floor.cpus} CPUs     ${mb(floor.ceilingMBps)} compressing ${(100 * floor.mustCompress).toFixed(0)}% (the least for wire <= 0.4) and nothing else; ` +
        `${mb(result.codecFloor.ceilingWithCopyMBps)} adding cp's own read+write time; 0.8 x cp needs ${mb(result.codecFloor.neededForTargetMBps)}`,
    );
    console.log(`results: ${out}`);
    if (!identical) process.exitCode = 1;
  } finally {
    await Promise.all(daemons.map((d) => d.stop()));
    if (process.env.TM_BENCH_KEEP) console.log(`kept ${dir}`);
    else await fsp.rm(dir, { recursive: true, force: true });
  }
}

/**
 * The cases in the order of the default run, each loaded only when it runs.
 * `initial` (the first-mirror issue's comparison with cp alone, superseded by
 * the link case) runs on request only.
 */
const CASES: { name: string; byDefault: boolean; run: () => Promise<void> }[] = [
  { name: 'link', byDefault: true, run: async () => (await import('./link.js')).linkBench() },
  { name: 'initial', byDefault: false, run: main },
  { name: 'incremental', byDefault: true, run: async () => (await import('./incremental.js')).incrementalBench() },
  { name: 'bandwidth', byDefault: true, run: async () => (await import('./bandwidth.js')).bandwidthBench() },
  { name: 'consistency', byDefault: true, run: async () => (await import('./consistency.js')).consistencyBench() },
  { name: 'mac', byDefault: true, run: async () => (await import('./frame-mac.js')).frameMacBench() },
  { name: 'eventloop', byDefault: true, run: async () => (await import('./eventloop.js')).eventLoopBench() },
  { name: 'rpo', byDefault: true, run: async () => (await import('./rpo.js')).rpoBench() },
];

/** TM_BENCH_ONLY=<case> runs one case; all but initial by default. */
async function all(): Promise<void> {
  const only = process.env.TM_BENCH_ONLY;
  if (only !== undefined && !CASES.some((c) => c.name === only)) {
    throw new Error(`TM_BENCH_ONLY=${only}: expected one of ${CASES.map((c) => c.name).join(', ')}`);
  }
  let first = true;
  for (const c of CASES) {
    if (only ? c.name !== only : !c.byDefault) continue;
    if (!first) console.log('');
    first = false;
    await c.run();
  }
}

all().catch((e) => {
  console.error(e);
  process.exit(1);
});
