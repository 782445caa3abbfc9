/** A shared page of zeros for comparisons (never written). */
const ZEROS = Buffer.alloc(64 * 1024);

/**
 * True when every byte of `buf` is zero. Compares against a shared zero buffer
 * with memcmp (Buffer.compare), many GB/s; the first byte is checked first
 * because data usually starts non-zero.
 */
export function isAllZero(buf: Uint8Array): boolean {
  if (buf.length === 0) return true;
  if (buf[0] !== 0 || buf[buf.length - 1] !== 0) return false;
  for (let at = 0; at < buf.length; at += ZEROS.length) {
    const n = Math.min(ZEROS.length, buf.length - at);
    if (Buffer.compare(buf.subarray(at, at + n), n === ZEROS.length ? ZEROS : ZEROS.subarray(0, n)) !== 0) return false;
  }
  return true;
}
