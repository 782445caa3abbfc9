import { ErrorCodes, TmError } from '../errors.js';
import type { ByteRange, Volume } from './volume.js';

/**
 * Batched access to scattered pieces of a volume: the volume's readPieces /
 * writePieces where it has them (a file or block device: one threadpool job
 * for the whole list), else one read / write per piece, all issued at once.
 * Pieces are ascending and non-overlapping; their bytes are packed one after
 * the other in the buffer.
 */

/** Sum of the pieces' lengths. Pure. */
export function totalLength(pieces: readonly ByteRange[]): number {
  let n = 0;
  for (const p of pieces) n += p.length;
  return n;
}

/**
 * The total length of `pieces`, checking that they are ascending and do not
 * overlap (TM_ERR_VOLUME_RANGE otherwise; whether each is inside the volume is
 * the volume's check).
 */
export function checkPieces(v: { readonly path: string }, pieces: readonly ByteRange[], what: string): number {
  let total = 0;
  let end = 0;
  for (let i = 0; i < pieces.length; i++) {
    const p = pieces[i]!;
    if (p.offset < end) throw new TmError(ErrorCodes.VOLUME_RANGE, `${what} ${v.path}: piece ${i} (${p.offset}+${p.length}) starts before the end of the one before it (${end}); pieces must be ascending and not overlap`);
    end = p.offset + p.length;
    total += p.length;
  }
  return total;
}

/**
 * Read `pieces` of `v` packed one after the other into `into`: resolves
 * `into.subarray(0, total)`. A volume with its own readPieces checks the
 * pieces itself; the fallback checks them here.
 *
 * @throws TmError TM_ERR_INTERNAL when `into` is shorter than the pieces' total;
 *   TM_ERR_VOLUME_RANGE for pieces out of order or outside the volume; the volume's read errors.
 */
export async function readPieces(v: Volume, pieces: readonly ByteRange[], into: Buffer): Promise<Buffer> {
  if (v.readPieces) return v.readPieces(pieces, into);
  const total = checkPieces(v, pieces, 'reading');
  if (into.length < total) throw new TmError(ErrorCodes.INTERNAL, `reading ${v.path}: ${pieces.length} pieces of ${total} bytes do not fit in ${into.length} bytes`);
  await eachPiece(pieces, into, (p, dst) =>
    v.read(p.offset, p.length, dst).then((got) => {
      if (got.buffer !== dst.buffer || got.byteOffset !== dst.byteOffset) got.copy(dst, 0, 0, p.length);
    }),
  );
  return into.subarray(0, total);
}

/**
 * Write the consecutive bytes of `data` to `pieces` of `v`. A volume with its
 * own writePieces checks the pieces itself; the fallback checks them here.
 *
 * @throws TmError TM_ERR_INTERNAL when `data.length` is not the pieces' total;
 *   TM_ERR_VOLUME_RANGE for pieces out of order or outside the volume; the volume's write errors.
 */
export async function writePieces(v: Volume, pieces: readonly ByteRange[], data: Buffer): Promise<void> {
  if (v.writePieces) return v.writePieces(pieces, data);
  const total = checkPieces(v, pieces, 'writing');
  if (data.length !== total) throw new TmError(ErrorCodes.INTERNAL, `writing ${v.path}: ${data.length} bytes for ${pieces.length} pieces of ${total} bytes`);
  await eachPiece(pieces, data, (p, src) => v.write(p.offset, src));
}

/** `op` on every piece with its slice of `buf` (the pieces packed one after the other), all at once; settles as {@link settleAll}. */
function eachPiece(pieces: readonly ByteRange[], buf: Buffer, op: (p: ByteRange, slice: Buffer) => Promise<void>): Promise<void> {
  let at = 0;
  return settleAll(
    pieces.map((p) => {
      const slice = buf.subarray(at, at + p.length);
      at += p.length;
      return op(p, slice);
    }),
  );
}

/**
 * Promise.all that rejects only once every promise has settled, with the first
 * rejection: no read is still filling the caller's buffer (nor a write still
 * reading it) when the caller learns of the failure.
 */
async function settleAll(all: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(all);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}
