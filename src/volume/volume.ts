import { ErrorCodes, TmError } from '../errors.js';

/**
 * The storage interface every backend implements: a sparse file (or a block
 * device opened as a file: sparse-file.ts), a block device with an optional
 * allocation map (block-device.ts: loop devices, LVM thin snapshots) and
 * memory (memory.ts, for tests). factory.ts picks the backend for a path.
 * Offsets and lengths are bytes. A backend never knows about the network or
 * about mirrors.
 */

/** A byte range [offset, offset + length). */
export interface ByteRange {
  offset: number;
  length: number;
}

/** What a backend can do, probed once at open and remembered. */
export interface VolumeCapabilities {
  /** Allocation map comes from the filesystem (SEEK_DATA/SEEK_HOLE); false means "all allocated". */
  allocationMap: boolean;
  /** Zeroing can deallocate (punch hole / discard). */
  punchHole: boolean;
  /** FALLOC_FL_ZERO_RANGE works. */
  zeroRange: boolean;
}

export interface Volume {
  readonly path: string;
  /** Size in bytes; need not be a multiple of any chunk size. */
  readonly size: number;
  readonly kind: 'file' | 'block' | 'memory';
  readonly capabilities: VolumeCapabilities;
  /**
   * Allocated ranges, ascending, non-overlapping, merged. With `within`, only
   * the allocated bytes inside that range (clipped to it). With `alignTo`,
   * every range is then widened outward to multiples of `alignTo` (clipped to
   * `size`) and ranges that then touch or overlap are merged. A big map is
   * walked in slices that give the event loop back between them.
   */
  allocated(alignTo?: number, within?: ByteRange): Promise<ByteRange[]>;
  /**
   * The allocated bytes, what totalBytes(allocated()) gives, where the volume
   * can count them without building the list (a million ranges are a million
   * objects for the garbage collector). Use {@link allocatedBytesOf}.
   */
  allocatedBytes?(): Promise<number>;
  /** Read exactly `length` bytes at `offset` (short only at end of volume is an error). */
  read(offset: number, length: number, into?: Buffer): Promise<Buffer>;
  write(offset: number, data: Buffer): Promise<void>;
  /**
   * Read `pieces` (ascending, non-overlapping, inside the volume) packed one
   * after the other into `into` (at least their total length): resolves
   * `into.subarray(0, total)`. Where the backend can do it in fewer round
   * trips than a read per piece (one threadpool job for the whole list).
   * Callers use readPieces() of pieces.ts, which falls back to read().
   * Checks the pieces and `into` as that fallback does (same codes).
   */
  readPieces?(pieces: readonly ByteRange[], into: Buffer): Promise<Buffer>;
  /**
   * Write the consecutive bytes of `data` (exactly the pieces' total length)
   * to `pieces` (ascending, non-overlapping, inside the volume), the batched
   * form of write(); the bytes between pieces are left as they are (holes stay
   * holes). Callers use writePieces() of pieces.ts, which falls back to write().
   * Checks the pieces and `data` as that fallback does (same codes).
   */
  writePieces?(pieces: readonly ByteRange[], data: Buffer): Promise<void>;
  /** Make the range read as zeros, deallocating where the backend can. */
  zero(offset: number, length: number): Promise<void>;
  /** Make data durable (fdatasync). */
  flush(): Promise<void>;
  close(): Promise<void>;
}

/** Merge ascending ranges that touch or overlap. Pure. */
export function mergeRanges(ranges: ByteRange[]): ByteRange[] {
  const out: ByteRange[] = [];
  for (const r of ranges) {
    if (r.length <= 0) continue;
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length) {
      const end = Math.max(last.offset + last.length, r.offset + r.length);
      last.length = end - last.offset;
    } else {
      out.push({ offset: r.offset, length: r.length });
    }
  }
  return out;
}

/** Widen ranges outward to multiples of `align`, clip to `size`, merge. Pure. */
export function alignRanges(ranges: ByteRange[], align: number, size: number): ByteRange[] {
  return mergeRanges(
    ranges.map((r) => {
      const start = Math.floor(r.offset / align) * align;
      const end = Math.min(size, Math.ceil((r.offset + r.length) / align) * align);
      return { offset: start, length: end - start };
    }),
  );
}

/** The parts of ascending, merged `ranges` inside `within` (clipped to it). Pure. */
export function clipRanges(ranges: ByteRange[], within?: ByteRange): ByteRange[] {
  if (!within) return ranges;
  const from = within.offset;
  const to = within.offset + within.length;
  const out: ByteRange[] = [];
  for (const r of ranges) {
    const s = Math.max(r.offset, from);
    const e = Math.min(r.offset + r.length, to);
    if (e > s) out.push({ offset: s, length: e - s });
  }
  return out;
}

/**
 * Builds an allocation map range by range: each range given in ascending
 * order is widened to `align` (when given, clipped to `size`) and merged with
 * the last one when they touch. What {@link alignRanges} does in one pass,
 * for a walk that cannot hold the raw map first.
 */
export class RangeBuilder {
  readonly ranges: ByteRange[] = [];

  constructor(
    private readonly size: number,
    private readonly align?: number,
  ) {}

  add(offset: number, end: number): void {
    if (end <= offset) return;
    if (this.align) {
      offset = Math.floor(offset / this.align) * this.align;
      end = Math.min(this.size, Math.ceil(end / this.align) * this.align);
    }
    const last = this.ranges[this.ranges.length - 1];
    if (last && offset <= last.offset + last.length) last.length = Math.max(last.offset + last.length, end) - last.offset;
    else this.ranges.push({ offset, length: end - offset });
  }
}

/** The allocated bytes of `v`: counted by the volume where it can, else summed from its map. */
export async function allocatedBytesOf(v: Volume): Promise<number> {
  return v.allocatedBytes ? v.allocatedBytes() : totalBytes(await v.allocated());
}

/** Sum of lengths. */
export function totalBytes(ranges: ByteRange[]): number {
  let n = 0;
  for (const r of ranges) n += r.length;
  return n;
}

/**
 * The checks every volume makes before an access: open, and [offset, offset +
 * length) inside it (TM_ERR_VOLUME_IO when closed, TM_ERR_VOLUME_RANGE outside).
 */
export function checkAccess(v: { readonly path: string; readonly size: number }, closed: boolean, offset: number, length: number, what: string): void {
  if (closed) throw new TmError(ErrorCodes.VOLUME_IO, `volume ${v.path} is closed`);
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > v.size) {
    throw new TmError(ErrorCodes.VOLUME_RANGE, `${what} ${offset}+${length} is outside volume ${v.path} (${v.size} bytes)`);
  }
}

/** A write, zero or trim on a volume opened read-only is refused up front (TM_ERR_VOLUME_IO). */
export function checkWritable(v: { readonly path: string }, readOnly: boolean, what: string): void {
  if (readOnly) throw new TmError(ErrorCodes.VOLUME_IO, `${what}: ${v.path} is open read-only`);
}
