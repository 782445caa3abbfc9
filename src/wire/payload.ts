import { ErrorCodes, TmError } from '../errors.js';
import { native } from '../native/index.js';
import { LZ4_PREFIX_BYTES, lz4PayloadProblem } from './lz4-block.js';
import { dataBytes, type ExtentMsg } from './messages.js';

/**
 * The payload codec of data extents (docs/protocol.md): lz4 when it saves
 * space, and the CRC-32C of the uncompressed bytes, both by the native addon
 * (compression on the threadpool). The frame codec (codec.ts) only checks a
 * payload's shape; this file makes and opens payloads.
 *
 * Copies: {@link decompressPayload} returns the payload itself (a view into the
 * frame, see codec.ts) for `raw` and, for `lz4`, the caller's scratch buffer or
 * one new buffer.
 */

/** CRC-32C (Castagnoli, as iSCSI and ext4) of `buf`: an unsigned 32-bit integer. SSE4.2 where the CPU has it (native addon). */
export function crc32c(buf: Uint8Array): number {
  return native().crc32c(buf);
}

/** A data payload ready to send: lz4 or raw, and the CRC-32C of the uncompressed bytes. */
export interface PreparedPayload {
  codec: 'raw' | 'lz4';
  payload: Buffer;
  crc32c: number;
}

/**
 * Compress a data payload with lz4 (uint32 LE length prepended, then one LZ4
 * block) and take its CRC-32C, both in one pass on the threadpool (native
 * addon, upstream liblz4). lz4 is kept only when strictly smaller than `raw`
 * and at most `keepRatio` of it (default 1: any saving);
 * otherwise the payload is `raw` itself (no copy). The lz4 bytes go to the
 * start of `into` when given (it must not overlap `raw`, and must stay
 * untouched while the payload is in use), else to a new buffer; a compressed
 * payload never needs more than `raw.length` bytes.
 */
export async function compressPayload(raw: Buffer, into?: Buffer, keepRatio = 1): Promise<PreparedPayload> {
  const dst = into && into.length >= raw.length ? into : Buffer.allocUnsafe(raw.length);
  const [n, crc] = await native().lz4CompressCrc(raw, dst);
  const keep = n > 0 && (keepRatio >= 1 || n <= raw.length * keepRatio);
  return keep ? { codec: 'lz4', payload: dst.subarray(0, n), crc32c: crc } : { codec: 'raw', payload: raw, crc32c: crc };
}

/**
 * The uncompressed bytes of a data extent (its pieces joined when it has
 * `runs`), checked against its CRC-32C: the
 * payload itself for `raw`; for `lz4`, the start of `scratch` when it holds
 * that many bytes (the caller must be done with what it held before), else one
 * new buffer. lz4 is decoded by the native addon straight into that buffer.
 * Nothing of a payload that fails must be written.
 *
 * @throws TmError TM_ERR_CHECKSUM when the bytes do not match `crc32c` or lz4
 *   yields another length than the extent holds; TM_ERR_PROTOCOL when the lz4 payload
 *   is not lz4; TM_ERR_INTERNAL when called on a zero or trim extent.
 */
export function decompressPayload(msg: ExtentMsg, scratch?: Buffer): Buffer {
  const where = `extent at offset ${msg.offset}, length ${msg.length}${msg.runs ? ` (${msg.runs.length / 2} pieces)` : ''}`;
  const length = dataBytes(msg);
  if (msg.kind !== 'data' || !msg.payload || msg.crc32c === undefined) throw new TmError(ErrorCodes.INTERNAL, `${where}: a ${msg.kind} extent without a payload has nothing to decompress`);
  let raw: Buffer;
  if (msg.codec === 'lz4') {
    // Also checked by decode; repeated because the prefix bounds the output.
    const why = lz4PayloadProblem(msg.payload, length);
    if (why) throw new TmError(ErrorCodes.PROTOCOL, `${where}: the lz4 payload does not decompress: ${why}`);
    let n: number;
    try {
      raw = scratch && scratch.length >= length ? scratch.subarray(0, length) : Buffer.allocUnsafe(length);
      n = native().lz4DecompressInto(msg.payload.subarray(LZ4_PREFIX_BYTES), raw);
    } catch (e) {
      throw new TmError(ErrorCodes.PROTOCOL, `${where}: the lz4 payload does not decompress: ${e instanceof Error ? e.message : String(e)}`);
    }
    if (n < 0) throw new TmError(ErrorCodes.PROTOCOL, `${where}: the lz4 payload does not decompress: malformed lz4 block or more than ${length} bytes`);
    if (n !== length) throw new TmError(ErrorCodes.CHECKSUM, `${where}: the lz4 payload decompresses to ${n} bytes; nothing written`);
  } else {
    raw = msg.payload;
    if (raw.length !== length) throw new TmError(ErrorCodes.CHECKSUM, `${where}: the raw payload holds ${raw.length} bytes; nothing written`);
  }
  if (crc32c(raw) !== msg.crc32c) throw new TmError(ErrorCodes.CHECKSUM, `${where}: the payload does not match its CRC-32C; nothing written`);
  return raw;
}

/** A data extent of `raw` at `offset` (bytes): lz4 when that is smaller, CRC-32C of `raw`. */
export async function makeDataExtent(seq: number, offset: number, raw: Buffer): Promise<ExtentMsg> {
  const { codec, payload, crc32c } = await compressPayload(raw);
  return { type: 'extent', seq, kind: 'data', offset, length: raw.length, codec, crc32c, payload };
}
