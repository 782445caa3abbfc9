// Probe (not part of npm run bench): how fast the primary's prepare pipeline runs alone on a file.
import { SparseFileVolume } from '../src/volume/sparse-file.js';
import { compressPayload } from '../src/wire/payload.js';
import { chunkDigest } from '../src/volume/digest.js';
import { createSampleVolume } from '../src/util/sample.js';
const f = '/tmp/probe.img';
await createSampleVolume(f, { size: 2 * 1024 ** 3, allocated: 512 * 1024 ** 2, extents: 512, seed: 42 });
const v = await SparseFileVolume.open(f, { readOnly: true });
const alloc = await v.allocated(65536);
const out = Buffer.alloc(16);
for (const mode of ['read', 'read+digest', 'read+digest+lz4+crc']) {
  const t = performance.now();
  let bytes = 0;
  const pieces: { offset: number; length: number }[] = [];
  for (const r of alloc) for (let o = r.offset; o < r.offset + r.length; o += 1 << 20) pieces.push({ offset: o, length: Math.min(1 << 20, r.offset + r.length - o) });
  const work = async (p: { offset: number; length: number }) => {
    const b = await v.read(p.offset, p.length);
    if (mode !== 'read') for (let a = 0; a < b.length; a += 65536) chunkDigest(b.subarray(a, a + 65536), out, 0);
    if (mode === 'read+digest+lz4+crc') await compressPayload(b);
    bytes += b.length;
  };
  const inflight: Promise<void>[] = [];
  for (const p of pieces) { inflight.push(work(p)); if (inflight.length >= 4) await inflight.shift(); }
  await Promise.all(inflight);
  const s = (performance.now() - t) / 1000;
  console.log(`${mode}: ${(bytes / 1e6 / s).toFixed(0)} MB/s`);
}
await v.close();
(await import('node:fs')).rmSync(f);
