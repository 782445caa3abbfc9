import { createHash } from 'node:crypto';
import { native } from '../native/index.js';
import { isAllZero } from './zero.js';

/**
 * The one chunk digest of thinmirror: what the scan change source keeps per
 * chunk, what the secondary answers a digest request with and what the primary
 * compares them to. All three must agree byte for byte, so it lives here once.
 */

/** Bytes per chunk digest: SHA-256 truncated to 128 bits. */
export const DIGEST_BYTES = 16;
/** The digest of a chunk that reads as zeros (hole or zero data). Never written to. */
export const ZERO_DIGEST = Buffer.alloc(DIGEST_BYTES, 0);
/** The digest of a chunk whose state is unknown: never equal to a computed digest in practice. Never written to. */
export const UNKNOWN_DIGEST = Buffer.alloc(DIGEST_BYTES, 0xff);

/**
 * Write the digest of a chunk's content to `out` at byte `at` (DIGEST_BYTES
 * bytes): ZERO_DIGEST when every byte is zero, else SHA-256 truncated to
 * DIGEST_BYTES, with byte 0 set to 1 if that truncation happens to be all
 * zero, so that only zero content has the zero digest.
 */
export function chunkDigest(data: Buffer, out: Buffer, at: number): void {
  if (isAllZero(data)) {
    out.fill(0, at, at + DIGEST_BYTES);
    return;
  }
  const d = createHash('sha256').update(data).digest();
  d.copy(out, at, 0, DIGEST_BYTES);
  // A computed digest of all zero bytes would read as "zeros": keep it distinct.
  if (out.compare(ZERO_DIGEST, 0, DIGEST_BYTES, at, at + DIGEST_BYTES) === 0) out[at] = 1;
}

/**
 * The digests of every chunk of `buf` (`chunkSize` bytes each, the last one
 * may be short), DIGEST_BYTES each, the same bytes as {@link chunkDigest}
 * gives: computed off the main thread, on the threadpool, in one job.
 * `buf` must not change until it resolves.
 */
export async function chunkDigests(buf: Uint8Array, chunkSize: number): Promise<Buffer> {
  const out = Buffer.allocUnsafe(Math.ceil(buf.length / chunkSize) * DIGEST_BYTES);
  if (buf.length > 0) await native().chunkDigests(buf, chunkSize, out);
  return out;
}

/** Whether digest number `i` of `digests` is {@link ZERO_DIGEST} (the chunk reads as zeros). */
export function isZeroDigest(digests: Buffer, i: number): boolean {
  const at = i * DIGEST_BYTES;
  return digests.compare(ZERO_DIGEST, 0, DIGEST_BYTES, at, at + DIGEST_BYTES) === 0;
}
