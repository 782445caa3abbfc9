/**
 * Bandwidth case of `npm run bench` (issue 4): the measured wire rate of an
 * initial sync against the configured cap, in the same run as an uncapped sync
 * of the same data (the peer it is compared with).
 *
 * Volumes hold incompressible (random) data, so wire bytes are about the payload
 * and the cap is what limits. Three runs, daemons as separate processes on
 * loopback:
 *   1. uncapped, one mirror;
 *   2. `bandwidth: CAP` on one mirror;
 *   3. `peers: [{ url, bandwidth: CAP }]` shared by two mirrors to the same
 *      secondary: their sum against the cap, and how evenly they share it.
 * The rate is taken from status samples: wire bytes between the first sample
 * after one second and the last sample before the sync ended (steady state),
 * and over the whole sync.
 *
 * Environment: TM_BENCH_BW_CAP (default 32MiB/s), TM_BENCH_BW_ALLOCATED
 * (bytes per mirror, default 256 MiB), TM_BENCH_KEEP.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DaemonProcess } from '../src/cli/daemon-process.js';
import type { DaemonStatus } from '../src/daemon/control.js';
import { createSampleVolume } from '../src/util/sample.js';
import { formatBytes, parseRate } from '../src/util/units.js';
import { freePort, sha256File, startPair, writeMirrorConfigs } from '../test/helpers/pair-config.js';
import { writeResult } from './results.js';

const MiB = 1024 * 1024;

interface Sample {
  t: number;
  wire: Record<string, number>;
}

interface RunResult {
  name: string;
  cap: { perMirror: number | null; perPeer: number | null };
  seconds: number;
  wireBytes: Record<string, number>;
  /** Bytes per second over the whole sync, all mirrors together. */
  overallRate: number;
  /** Bytes per second between the first sample after 1 s and the last sample, all mirrors together. */
  steadyRate: number;
  /** Steady rate of each mirror. */
  perMirrorRate: Record<string, number>;
  identical: boolean;
}

async function run(
  dir: string,
  name: string,
  volumes: { mirror: string; source: string }[],
  caps: { perMirror?: number; perPeer?: number },
): Promise<RunResult> {
  const work = path.join(dir, name);
  await fsp.mkdir(work);
  const port = await freePort();
  const cfg = await writeMirrorConfigs({
    dir: work,
    port,
    interval: '1h',
    mirrors: volumes.map((v) => ({ name: v.mirror, source: v.source, target: path.join(work, `${v.mirror}.target.img`) })),
    ...(caps.perPeer ? { primaryTop: { peers: [{ url: `ws://127.0.0.1:${port}`, bandwidth: caps.perPeer }] } } : {}),
    ...(caps.perMirror ? { extraPrimary: { bandwidth: caps.perMirror } } : {}),
  });
  const daemons: DaemonProcess[] = [];
  try {
    const { primary, t0 } = await startPair(cfg, work, daemons);
    const samples: Sample[] = [];
    let lastPrint = 0;
    const done = (s: DaemonStatus) => s.mirrors.length === volumes.length && s.mirrors.every((m) => m.committedGeneration >= 1 && m.state === 'in-sync');
    await primary.waitFor(
      (s) => {
        for (const m of s.mirrors) if (m.error) throw new Error(`mirror ${m.name} failed: ${m.error.code}: ${m.error.message}`);
        const t = (performance.now() - t0) / 1000;
        if (!done(s)) samples.push({ t, wire: Object.fromEntries(s.mirrors.map((m) => [m.name, m.wireBytes])) });
        if (Date.now() - lastPrint > 2000) {
          lastPrint = Date.now();
          const total = s.mirrors.reduce((a, m) => a + m.wireBytes, 0);
          console.log(`  ${name}: ${t.toFixed(1)} s, ${formatBytes(total)} on the wire`);
        }
        return done(s);
      },
      900_000,
      `the ${name} sync`,
      100,
    );
    const seconds = (performance.now() - t0) / 1000;
    const st = await primary.status();
    await Promise.all(daemons.map((d) => d.stop()));
    const wireBytes = Object.fromEntries(st.mirrors.map((m) => [m.name, m.wireBytes]));
    const total = Object.values(wireBytes).reduce((a, b) => a + b, 0);
    const first = samples.find((s) => s.t >= 1);
    const last = samples[samples.length - 1];
    const perMirrorRate: Record<string, number> = {};
    let steadyRate = NaN;
    if (first && last && last.t > first.t) {
      const span = last.t - first.t;
      for (const v of volumes) perMirrorRate[v.mirror] = ((last.wire[v.mirror] ?? 0) - (first.wire[v.mirror] ?? 0)) / span;
      steadyRate = Object.values(perMirrorRate).reduce((a, b) => a + b, 0);
    }
    let identical = true;
    for (const v of volumes) identical &&= (await sha256File(v.source)) === (await sha256File(path.join(work, `${v.mirror}.target.img`)));
    return {
      name,
      cap: { perMirror: caps.perMirror ?? null, perPeer: caps.perPeer ?? null },
      seconds,
      wireBytes,
      overallRate: total / seconds,
      steadyRate,
      perMirrorRate,
      identical,
    };
  } finally {
    await Promise.all(daemons.map((d) => d.stop()));
  }
}

const mbs = (r: number) => `${(r / MiB).toFixed(1)} MiB/s`;

export async function bandwidthBench(): Promise<void> {
  const cap = parseRate(process.env.TM_BENCH_BW_CAP ?? '32MiB/s');
  const allocated = Number(process.env.TM_BENCH_BW_ALLOCATED ?? 256 * MiB);
  const dir = await fsp.mkdtemp(path.join(process.env.TM_BENCH_DIR ?? os.tmpdir(), 'tm-bench-bw-'));
  try {
    console.log(`bandwidth: two 1 GiB sparse files with ${formatBytes(allocated)} of random data each; cap ${mbs(cap)} (${dir})`);
    const a = path.join(dir, 'a.img');
    const b = path.join(dir, 'b.img');
    await createSampleVolume(a, { size: 1024 * MiB, allocated, extents: 64, seed: 7, content: 'random' });
    await createSampleVolume(b, { size: 1024 * MiB, allocated, extents: 64, seed: 8, content: 'random' });
    const runs: RunResult[] = [];
    runs.push(await run(dir, 'uncapped', [{ mirror: 'a', source: a }], {}));
    runs.push(await run(dir, 'mirror-cap', [{ mirror: 'a', source: a }], { perMirror: cap }));
    runs.push(await run(dir, 'peer-cap', [{ mirror: 'a', source: a }, { mirror: 'b', source: b }], { perPeer: cap }));
    console.log('');
    console.log('run          cap               steady rate     overall rate   steady/cap  identical');
    for (const r of runs) {
      const c = r.cap.perMirror ?? r.cap.perPeer;
      const capText = c === null ? 'none' : `${mbs(c)} ${r.cap.perMirror ? 'mirror' : 'peer'}`;
      console.log(
        `${r.name.padEnd(12)} ${capText.padEnd(17)} ${mbs(r.steadyRate).padEnd(15)} ${mbs(r.overallRate).padEnd(14)} ${c === null ? '-'.padEnd(11) : (r.steadyRate / c).toFixed(3).padEnd(11)} ${r.identical}`,
      );
      if (Object.keys(r.perMirrorRate).length > 1) {
        console.log(`             shares: ${Object.entries(r.perMirrorRate).map(([k, v]) => `${k} ${mbs(v)}`).join(', ')}`);
      }
    }
    const result = { date: new Date().toISOString(), host: { cpus: os.cpus().length, node: process.version }, capBytesPerSecond: cap, allocatedBytesPerMirror: allocated, runs };
    console.log(`results: ${await writeResult('bandwidth', result)}`);
  } finally {
    if (process.env.TM_BENCH_KEEP) console.log(`kept ${dir}`);
    else await fsp.rm(dir, { recursive: true, force: true });
  }
}
