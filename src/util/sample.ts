import { randomFillSync } from 'node:crypto';
import { promises as fsp } from 'node:fs';

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

const LEVELS = ['INFO', 'INFO', 'INFO', 'INFO', 'DEBUG', 'WARN', 'ERROR'];
const METHODS = ['GET', 'GET', 'GET', 'POST', 'PUT', 'DELETE'];
const PATHS = ['/api/v1/items', '/api/v1/users', '/api/v1/orders', '/static/app.js', '/healthz', '/api/v1/search', '/login'];
const MESSAGES = [
  'request completed',
  'cache miss, fetching from origin',
  'connection reset by peer, retrying',
  'slow query detected on table orders',
  'session refreshed for user',
  'rate limit applied to client',
];

/**
 * `length` bytes of text-like data: application log lines (ISO timestamps that
 * advance, a few levels, request paths, numeric fields with realistic ranges).
 * Like real logs it is redundant: lz4 keeps roughly a third of it.
 */
export function textLike(length: number, rnd: () => number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  let pos = 0;
  let t = Date.UTC(2026, 10, 23) + Math.floor(rnd() * 1e9);
  while (pos < length) {
    t += Math.floor(rnd() * 50);
    const pick = <T>(a: T[]) => a[Math.floor(rnd() * a.length)]!;
    const line =
      `${new Date(t).toISOString()} ${pick(LEVELS).padEnd(5)} [worker-${Math.floor(rnd() * 8)}] ${pick(METHODS)} ${pick(PATHS)}/${Math.floor(rnd() * 5000)} ` +
      `status=${rnd() < 0.9 ? 200 : pick([301, 404, 500])} bytes=${Math.floor(rnd() * 20000)} latency_ms=${Math.floor(rnd() * rnd() * 900)} ` +
      `user=u${Math.floor(rnd() * 2000)} msg="${pick(MESSAGES)}"\n`;
    pos += buf.write(line, pos, 'latin1');
  }
  return buf;
}

export interface SampleVolumeOptions {
  size: number;
  /** Bytes to allocate in total, spread over `extents` extents at random offsets. */
  allocated: number;
  extents: number;
  seed?: number;
  /** 'text' (log-like, compressible, reproducible from the seed) or 'random' (incompressible). */
  content?: 'text' | 'random';
  /** Align extent offsets and lengths to this many bytes (default 4096). */
  align?: number;
}

/** A written range in bytes: a volume ByteRange's shape, spelled out because util imports no layer. */
export interface SampleRange {
  offset: number;
  length: number;
}

/**
 * Create a sparse file of `size` bytes with about `allocated` bytes written in
 * `extents` scattered, non-overlapping extents. Returns the written ranges.
 */
export async function createSampleVolume(path: string, o: SampleVolumeOptions): Promise<SampleRange[]> {
  const rnd = prng(o.seed ?? 1);
  const align = o.align ?? 4096;
  const per = Math.max(align, Math.floor(o.allocated / o.extents / align) * align);
  const slots = Math.floor(o.size / align);
  const ranges: SampleRange[] = [];
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
        const data = o.content === 'random' ? randomBuffer(len) : textLike(len, rnd);
        await fh.write(data, 0, len, r.offset + done);
      }
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return ranges;
}

/** Incompressible bytes (not reproducible from the seed: speed matters more here). */
function randomBuffer(n: number): Buffer {
  return randomFillSync(Buffer.allocUnsafe(n));
}
