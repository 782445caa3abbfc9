import { promises as fsp } from 'node:fs';
import type { ByteRange } from '../volume/volume.js';

/** Deterministic PRNG (mulberry32), so sample volumes are reproducible from a seed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const WORDS = (
  'volume chunk extent mirror primary secondary generation commit replica thin sparse allocation bitmap ' +
  'the of and to in is that for it as with was on be by at this from or have an they which one you were ' +
  'error status cursor journal snapshot failover failback drill resume network daemon config checksum ' +
  'INFO WARN 2026-11-23T04:12:55Z request=GET /api/v1/items?page= 200 404 user_id= session= latency_ms='
).split(' ');

/**
 * `length` bytes of text-like data (log lines, words, numbers): compresses
 * with lz4 to roughly a third, as ordinary file data does.
 */
export function textLike(length: number, rnd: () => number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  let pos = 0;
  let line = 0;
  while (pos < length) {
    let s = `${1700000000 + Math.floor(rnd() * 1e8)} ${line++} `;
    const n = 4 + Math.floor(rnd() * 12);
    for (let i = 0; i < n; i++) {
      s += WORDS[Math.floor(rnd() * WORDS.length)]!;
      s += rnd() < 0.3 ? String(Math.floor(rnd() * 100000)) : ' ';
    }
    s += '\n';
    pos += buf.write(s, pos, 'latin1');
  }
  return buf;
}

export interface SampleVolumeOptions {
  size: number;
  /** Bytes to allocate in total, spread over `extents` extents at random offsets. */
  allocated: number;
  extents: number;
  seed?: number;
  /** 'text' (compressible) or 'random' (incompressible). */
  content?: 'text' | 'random';
  /** Align extent offsets and lengths to this many bytes (default 4096). */
  align?: number;
}

/**
 * Create a sparse file of `size` bytes with about `allocated` bytes written in
 * `extents` scattered, non-overlapping extents. Returns the written ranges.
 */
export async function createSampleVolume(path: string, o: SampleVolumeOptions): Promise<ByteRange[]> {
  const rnd = prng(o.seed ?? 1);
  const align = o.align ?? 4096;
  const per = Math.max(align, Math.floor(o.allocated / o.extents / align) * align);
  const slots = Math.floor(o.size / align);
  const ranges: ByteRange[] = [];
  // Pick extent starts in distinct strides of the volume so they never overlap.
  const stride = Math.floor(slots / o.extents);
  if (stride * align < per) throw new Error(`cannot fit ${o.extents} extents of ${per} bytes in ${o.size} bytes`);
  for (let i = 0; i < o.extents; i++) {
    const room = stride - per / align;
    const slot = i * stride + Math.floor(rnd() * (room + 1));
    ranges.push({ offset: slot * align, length: per });
  }
  const fh = await fsp.open(path, 'w');
  try {
    await fh.truncate(o.size);
    for (const r of ranges) {
      for (let done = 0; done < r.length; done += 1 << 20) {
        const len = Math.min(1 << 20, r.length - done);
        const data = o.content === 'random' ? randomBuffer(len, rnd) : textLike(len, rnd);
        await fh.write(data, 0, len, r.offset + done);
      }
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return ranges;
}

function randomBuffer(n: number, rnd: () => number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i + 4 <= n; i += 4) b.writeUInt32LE((rnd() * 4294967296) >>> 0, i);
  for (let i = n - (n % 4); i < n; i++) b[i] = (rnd() * 256) | 0;
  return b;
}
