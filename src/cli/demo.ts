import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ErrorCodes, TmError } from '../errors.js';
import type { MirrorStatus } from '../mirror/status.js';
import { createSampleVolume, prng, textLike } from '../util/sample.js';
import { sha256File } from '../util/sha256.js';
import { formatBytes } from '../util/units.js';
import { SparseFileVolume } from '../volume/sparse-file.js';
import type { DaemonProcess } from './daemon-process.js';
import { freePort, loopbackPair, startPair, writeLoopbackPair } from './loopback-pair.js';

function bar(done: number, total: number, width = 30): string {
  const f = total > 0 ? Math.min(1, done / total) : 1;
  const n = Math.round(f * width);
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}] ${(f * 100).toFixed(1).padStart(5)}%`;
}

/**
 * `demo`: the main job on an embedded default, without root. A sparse volume
 * with scattered text-like extents is mirrored between two daemons on
 * loopback; then chunks change and a hole is punched, and the next generation
 * arrives. Both images are compared by sha256 each time. Everything lives in a
 * temporary directory that is removed at the end (unless --keep).
 */
export async function runDemo(o: { size?: number; keep: boolean }): Promise<number> {
  const size = o.size ?? 512 * 1024 * 1024 + 12345; // not a multiple of the chunk size, on purpose
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'thinmirror-demo-'));
  const tty = process.stdout.isTTY;
  const say = (s: string) => console.log(s);
  const daemons: DaemonProcess[] = [];
  try {
    say(`thinmirror demo in ${dir}`);
    const source = path.join(dir, 'source.img');
    const target = path.join(dir, 'replica.img');
    const allocTarget = Math.floor(size / 4);
    await createSampleVolume(source, { size, allocated: allocTarget, extents: 40, seed: 7, content: 'text' });
    const srcStat = await fsp.stat(source);
    say(`source volume: ${formatBytes(size)}, ${formatBytes(srcStat.blocks * 512)} allocated in 40 extents of text-like data`);
    const port = await freePort();
    const cfg = await writeLoopbackPair(loopbackPair({ dir, port, mirrors: [{ name: 'demo', source, target }], interval: '1s' }));
    const { primary, t0 } = await startPair(cfg, dir, daemons);
    await primary.waitReady();
    say(`secondary (site-b) listening on 127.0.0.1:${port}, primary (site-a) started; logs in ${dir}`);

    let lastPrint = 0;
    const first = await primary.waitFor(
      (st) => {
        const m = st.mirrors[0]!;
        if (m.error) throw new TmError(m.error.code, `mirror failed: ${m.error.message}`);
        const now = Date.now();
        if (m.progress && (tty || now - lastPrint > 1000)) {
          lastPrint = now;
          const mbps = m.sentBytes / 1e6 / Math.max(0.001, (performance.now() - t0) / 1000);
          const line = `initial sync ${bar(m.progress.doneBytes, m.progress.totalBytes)}  ${formatBytes(m.sentBytes)} payload, ${formatBytes(m.wireBytes)} on the wire, ${mbps.toFixed(0)} MB/s`;
          if (tty) process.stdout.write(`\r${line}`);
          else say(line);
        }
        return m.committedGeneration >= 1 && m.state === 'in-sync';
      },
      120_000,
      'the initial sync',
      100,
    );
    const syncSeconds = (performance.now() - t0) / 1000;
    const m1 = first.mirrors[0]!;
    if (tty) process.stdout.write(`\r${' '.repeat(110)}\r`);
    say(`initial sync done: generation 1 committed ${syncSeconds.toFixed(2)} s after the primary started`);
    await compareImages(source, target, say);

    // Change some chunks, add an extent, punch a hole: the next generation carries them.
    const rnd = prng(99);
    const vol = await SparseFileVolume.open(source);
    try {
      for (let i = 0; i < 8; i++) {
        const off = Math.floor((rnd() * (size - (1 << 20))) / 4096) * 4096;
        await vol.write(off, textLike(64 * 1024 + Math.floor(rnd() * 8) * 4096, rnd));
      }
      const alloc = await vol.allocated(65536);
      const victim = alloc[Math.floor(alloc.length / 2)]!;
      await vol.zero(victim.offset, Math.min(victim.length, 1 << 20));
      await vol.flush();
      say(`changed 8 ranges of 64-96 KiB and punched a ${formatBytes(Math.min(victim.length, 1 << 20))} hole at ${victim.offset}`);
    } finally {
      await vol.close();
    }
    // A generation detected while we were writing may hold only part of the change: wait until the images match.
    const deadline = Date.now() + 60_000;
    let gen = m1.committedGeneration;
    let m2: MirrorStatus | undefined;
    for (;;) {
      const st = await primary.waitFor((s) => s.mirrors[0]!.committedGeneration > gen && s.mirrors[0]!.state === 'in-sync', Math.max(1000, deadline - Date.now()), 'the next generation');
      m2 = st.mirrors[0]!;
      gen = m2.committedGeneration;
      say(`generation ${gen} committed: ${formatBytes(m2.lastCycle?.changedBytes ?? 0)} in changed chunks, ${formatBytes(m2.lastCycle?.wireBytes ?? 0)} on the wire, ${(m2.lastCycle?.durationSeconds ?? 0).toFixed(2)} s`);
      if ((await sha256File(source)) === (await sha256File(target))) break;
      if (Date.now() > deadline) throw new TmError(ErrorCodes.VERIFY, 'the replica did not converge within 60 s');
    }
    await compareImages(source, target, say);
    const tgtStat = await fsp.stat(target);
    say('');
    say('summary');
    say(`  volume            ${formatBytes(size)} (${size} bytes)`);
    say(`  allocated         source ${formatBytes(srcStat.blocks * 512)}, replica ${formatBytes(tgtStat.blocks * 512)}`);
    say(`  initial sync      ${formatBytes(m1.sentBytes)} payload, ${formatBytes(m1.wireBytes)} on the wire (${((100 * m1.wireBytes) / Math.max(1, m1.sentBytes)).toFixed(0)}%), ${(m1.sentBytes / 1e6 / syncSeconds).toFixed(0)} MB/s of allocated data`);
    say(`  total             ${formatBytes(m2.sentBytes)} payload, ${formatBytes(m2.wireBytes)} on the wire, generation ${m2.committedGeneration} committed`);
    say('demo ok');
    return 0;
  } finally {
    await Promise.all(daemons.map((d) => d.stop()));
    if (o.keep) say(`kept ${dir}`);
    else await fsp.rm(dir, { recursive: true, force: true });
  }
}

async function compareImages(a: string, b: string, say: (s: string) => void): Promise<void> {
  const [ha, hb] = await Promise.all([sha256File(a), sha256File(b)]);
  if (ha !== hb) throw new TmError(ErrorCodes.VERIFY, `images differ: ${a} sha256 ${ha}, ${b} sha256 ${hb}`);
  say(`images match: sha256 ${ha.slice(0, 16)}...`);
}
