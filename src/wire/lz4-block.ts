/**
 * The lz4 form of a data payload (protocol v2): the uncompressed length as a
 * uint32 little-endian (lz4_flex "size prepended"), then one lz4 block. Shared
 * by the codec's validation and the payload codec; no I/O, no native code.
 */

/** Bytes of the uncompressed-length prefix. */
export const LZ4_PREFIX_BYTES = 4;

/**
 * Why `payload` cannot be the lz4 form of `length` bytes, or null. It must be
 * smaller than the data (else it travels raw), and announce `length` exactly:
 * the announced length bounds what decompression allocates (no lz4 bomb).
 */
export function lz4PayloadProblem(payload: Buffer, length: number): string | null {
  if (payload.length <= LZ4_PREFIX_BYTES || payload.length >= length) {
    return `extent.payload of ${payload.length} bytes cannot be lz4 of length ${length}: it must hold ${LZ4_PREFIX_BYTES + 1}..${length - 1} bytes`;
  }
  const announced = payload.readUInt32LE(0);
  return announced !== length ? `extent.payload announces ${announced} lz4 bytes, length is ${length}` : null;
}
