import { ErrorCodes, TmError } from '../errors.js';
import { chunkDigests, DIGEST_BYTES } from './digest.js';
import type { ByteRange, Volume } from './volume.js';

/**
 * The one walk over a volume's allocation map: cut byte ranges into holes
 * (never read: they read as zeros) and allocated pieces, read the pieces in
 * bounded windows, digest chunk by chunk. The scan change source, the sender,
 * the reconciliation and the secondary's digest answers all go through here.
 * Offsets and lengths are bytes.
 */

/** A piece of a byte range: a hole (unallocated, never read) or allocated bytes. */
export interface Segment {
  hole: boolean;
  offset: number;
  length: number;
}

/** One item of {@link walk}: `data` is null for a hole, else the bytes read at [offset, offset + length). */
export interface WalkItem {
  offset: number;
  length: number;
  data: Buffer | null;
}

export interface WalkOptions {
  /** First byte (inclusive). */
  from: number;
  /** Last byte (exclusive), at most the volume's size. */
  to: number;
  /** Bytes per read at most; rounded down to a multiple of `chunkSize`, at least one chunk. */
  window: number;
  /**
   * The allocation map to cut against: ascending, merged, aligned to
   * `chunkSize` (what `volume.allocated(chunkSize)` returns). Defaults to
   * exactly that. Passing it lets a caller walk many windows on one map.
   */
  alloc?: ByteRange[];
  chunkSize: number;
  /** Checked before every read. */
  signal?: AbortSignal;
}

/** Bytes per read of {@link digestRange}. */
const DIGEST_READ_BYTES = 4 * 1024 * 1024;

/** Index of the first range of `alloc` (from `lo`) that ends after `pos`: binary search. */
function firstEndingAfter(alloc: ByteRange[], pos: number, lo: number): number {
  let hi = alloc.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    const r = alloc[mid]!;
    if (r.offset + r.length <= pos) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * Cut byte ranges [start, end), given ascending and not overlapping, against
 * the ascending, merged allocation map `alloc`: every byte of every range
 * comes out exactly once, in order, as a hole (no allocated byte in it; one
 * segment per gap) or as an allocated piece of at most `maxPiece` bytes.
 * Pieces start where an allocated range or an input range starts and are cut
 * every `maxPiece` bytes from there. Empty ranges yield nothing.
 *
 * Cost: O(log(alloc.length)) to find the start of each range, then linear,
 * so a caller can walk a big map window by window.
 *
 * @throws TmError TM_ERR_INTERNAL if `maxPiece` is not a positive integer or
 *   the ranges are not ascending (a bug in the caller).
 */
export function* segments(ranges: Iterable<[number, number]>, alloc: ByteRange[], maxPiece: number): Generator<Segment> {
  if (!Number.isSafeInteger(maxPiece) || maxPiece <= 0) throw new TmError(ErrorCodes.INTERNAL, `segments: maxPiece ${maxPiece} is not a positive integer`);
  let ai = 0;
  let prevEnd = -Infinity;
  for (const [start, end] of ranges) {
    if (end <= start) continue;
    if (start < prevEnd) throw new TmError(ErrorCodes.INTERNAL, `segments: range ${start}..${end} starts before the previous one ends (${prevEnd})`);
    prevEnd = end;
    let pos = start;
    ai = firstEndingAfter(alloc, pos, ai);
    while (pos < end) {
      while (ai < alloc.length && alloc[ai]!.offset + alloc[ai]!.length <= pos) ai++;
      const r = alloc[ai];
      if (!r || r.offset >= end) {
        yield { hole: true, offset: pos, length: end - pos };
        pos = end;
      } else if (r.offset > pos) {
        yield { hole: true, offset: pos, length: r.offset - pos };
        pos = r.offset;
      } else {
        const stop = Math.min(end, r.offset + r.length, pos + maxPiece);
        yield { hole: false, offset: pos, length: stop - pos };
        pos = stop;
      }
    }
  }
}

/**
 * Walk [from, to) of `volume` in ascending order: one item per hole run (data
 * null, nothing read) and the allocated bytes in reads of at most `window`
 * bytes (rounded down to whole chunks). With `from` on a chunk boundary and a
 * chunk-aligned map, every item starts on a chunk boundary and ends on one or
 * at `to`, so a consumer can digest chunk by chunk. Each item's buffer is its
 * own (not reused).
 *
 * @throws TmError TM_ERR_VOLUME_RANGE if [from, to) is not inside the volume;
 *   what `volume.read` throws; `signal.reason` once the signal is aborted
 *   (checked before every read).
 */
export async function* walk(volume: Volume, o: WalkOptions): AsyncGenerator<WalkItem> {
  const { from, to, chunkSize: cs, signal } = o;
  if (!Number.isSafeInteger(cs) || cs <= 0) throw new TmError(ErrorCodes.INTERNAL, `walk: chunk size ${cs} is not a positive integer`);
  if (!Number.isSafeInteger(from) || !Number.isSafeInteger(to) || from < 0 || to < from || to > volume.size) {
    throw new TmError(ErrorCodes.VOLUME_RANGE, `walk of ${from}..${to} is outside volume ${volume.path} (${volume.size} bytes)`);
  }
  const step = Math.max(cs, Math.floor(o.window / cs) * cs);
  // Only the map of [from, to): a window of a big volume must not walk the whole of its map.
  const alloc = o.alloc ?? (await volume.allocated(cs, { offset: from, length: to - from }));
  for (const seg of segments([[from, to]], alloc, step)) {
    if (seg.hole) {
      yield { offset: seg.offset, length: seg.length, data: null };
      continue;
    }
    signal?.throwIfAborted();
    const data = await volume.read(seg.offset, seg.length);
    yield { offset: seg.offset, length: seg.length, data };
  }
}

/**
 * The digests of the chunks of [offset, offset + length): DIGEST_BYTES per
 * chunk, in order (the last chunk may be short: the volume's tail). Holes give
 * the zero digest without being read; allocated data is read in 4 MiB windows.
 * `alloc`: as for {@link walk} (default: the map of this range only). Each
 * window is hashed on the threadpool (chunkDigests), off the event loop.
 *
 * @throws TmError TM_ERR_VOLUME_RANGE outside the volume; TM_ERR_INTERNAL if
 *   `offset` or a piece of `alloc` is not on a chunk boundary; what
 *   `volume.read` throws.
 */
export async function digestRange(volume: Volume, offset: number, length: number, chunkSize: number, alloc?: ByteRange[]): Promise<Buffer> {
  const cs = chunkSize;
  if (offset % cs !== 0) throw new TmError(ErrorCodes.INTERNAL, `digestRange: offset ${offset} is not a multiple of the chunk size ${cs}`);
  if (!Number.isSafeInteger(length) || length < 0) throw new TmError(ErrorCodes.VOLUME_RANGE, `digests of ${offset}+${length} are outside volume ${volume.path} (${volume.size} bytes)`);
  const out = Buffer.alloc(Math.ceil(length / cs) * DIGEST_BYTES, 0);
  for await (const w of walk(volume, { from: offset, to: offset + length, window: DIGEST_READ_BYTES, chunkSize: cs, alloc })) {
    if (w.data === null) continue; // zero digests already
    if (w.offset % cs !== 0) throw new TmError(ErrorCodes.INTERNAL, `digestRange: allocated piece at ${w.offset} is not on a chunk boundary (map not aligned to ${cs})`);
    // Hashed on the threadpool, one job per window: the main thread does not wait on it.
    (await chunkDigests(w.data.subarray(0, w.length), cs)).copy(out, ((w.offset - offset) / cs) * DIGEST_BYTES);
  }
  return out;
}
