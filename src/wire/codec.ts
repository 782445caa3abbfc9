import { Packr } from 'msgpackr';
import { ErrorCodes, TmError } from '../errors.js';
import { native } from '../native/index.js';
import {
  DIGEST_BYTES,
  MAX_DIGEST_RANGE,
  MAX_ERROR_MESSAGE,
  MAX_EXTENT_BYTES,
  MAX_NAME_LENGTH,
  NONCE_BYTES,
  PROOF_BYTES,
  type DecodeContext,
  type ExtentMsg,
  type Message,
} from './messages.js';

/**
 * The pure codec of protocol v2 (docs/protocol.md): messages to msgpack maps and
 * back. No I/O. Every field of every incoming frame is checked (type, range,
 * offset + length inside the volume) before anything acts on it; a violation is
 * a TmError(TM_ERR_PROTOCOL) whose message names the message type and the field
 * (`extent.offset 12345 is not a multiple of the chunk size 65536`). Outgoing
 * messages pass the same checks, so that a bug on this side never reaches the
 * wire (TM_ERR_INTERNAL).
 *
 * Copies: a decoded data extent's `payload` is a view into the frame, not a copy;
 * {@link decompressPayload} returns that same view for `raw` and, for `lz4`,
 * the caller's scratch buffer or one new buffer. A frame must therefore not be reused while its message is alive
 * (ws hands out a fresh Buffer per message).
 */

/** Smallest and largest chunk size, bytes. Every chunk size is a multiple of the smallest. */
export const MIN_CHUNK_SIZE = 4096;
export const MAX_CHUNK_SIZE = 4 * 1024 * 1024;
/** An lz4 payload starts with the uncompressed length, uint32 little-endian (lz4_flex "size prepended"). */
const LZ4_PREFIX_BYTES = 4;

// Configured once. Decoding: maps as plain objects (`__proto__` keys are renamed by
// msgpackr), 64-bit integers as numbers (anything beyond 2^53 then fails the
// safe-integer check), structured-clone references refused (no cycles), binary as
// Buffer views of the frame (copyBuffers false). Encoding: no records, no extension
// types; Buffers are msgpack bin.
const packr = new Packr({
  useRecords: false,
  mapsAsObjects: true,
  structuredClone: false,
  moreTypes: false,
  bundleStrings: false,
  copyBuffers: false,
  int64AsType: 'number',
});

const NAME_RE = /^[A-Za-z0-9._-]+$/;
const VOLUME_ID_RE = /^[0-9a-f]+$/;
const VOLUME_ID_MAX = 64;
const CODE_RE = /^TM_ERR_[A-Z_]{1,40}$/;
const CODE_MAX = 'TM_ERR_'.length + 40;

/** A validation failure; turned into PROTOCOL (decode) or INTERNAL (encode) at the boundary. */
class Invalid extends Error {}

type Obj = Record<string, unknown>;

/**
 * How strictly ranges are checked. `decode`: against the session's context, and an
 * extent without a settled volume is refused. `encode`: against the context when
 * the caller gives one, shape only otherwise (the sender knows its own volume).
 */
interface Mode {
  ctx: DecodeContext;
  needVolume: boolean;
}

function fail(msg: string): never {
  throw new Invalid(msg);
}

/** A short, safe rendering of a wire value for error messages (never the whole of a long string or buffer). */
function describe(v: unknown): string {
  if (v instanceof Uint8Array) return `${v.length} bytes of binary`;
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? v.slice(0, 40) + '...' : v);
  if (typeof v === 'bigint') return `${v}n`;
  if (typeof v === 'number') return Object.is(v, -0) ? '-0' : String(v);
  if (v === null || v === undefined || typeof v !== 'object') return String(v);
  if (Array.isArray(v)) return 'an array';
  return isPlain(v) ? 'a map' : `a ${v.constructor?.name ?? 'special'} object`;
}

function isPlain(v: unknown): v is Obj {
  if (typeof v !== 'object' || v === null) return false;
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

/** Every required key present, no other key than the required and optional ones. */
function checkKeys(o: Obj, t: string, required: readonly string[], optional: readonly string[] = []): void {
  for (const k of required) if (!Object.hasOwn(o, k)) fail(`${t}.${k} is missing`);
  for (const k of Object.keys(o)) {
    if (!required.includes(k) && !optional.includes(k)) fail(`${t} has an unknown field ${describe(k)}`);
  }
}

/** A safe integer >= min (no floats, NaN, infinities, bigints); -0 becomes 0. */
function uint(o: Obj, t: string, k: string, min = 0): number {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) {
    fail(`${t}.${k} must be an integer from ${min} to ${Number.MAX_SAFE_INTEGER}, got ${describe(v)}`);
  }
  return v === 0 ? 0 : v;
}

function name(o: Obj, t: string, k: string): string {
  const v = o[k];
  if (typeof v !== 'string' || v.length < 1 || v.length > MAX_NAME_LENGTH || !NAME_RE.test(v)) {
    fail(`${t}.${k} must be 1..${MAX_NAME_LENGTH} characters of A-Z a-z 0-9 . _ -, got ${describe(v)}`);
  }
  return v;
}

/** Binary of exactly `size` bytes; a Uint8Array becomes a Buffer over the same memory. */
function bytes(o: Obj, t: string, k: string, size?: number): Buffer {
  const v = o[k];
  if (!(v instanceof Uint8Array)) fail(`${t}.${k} must be binary, got ${describe(v)}`);
  if (size !== undefined && v.length !== size) fail(`${t}.${k} must be ${size} bytes, got ${v.length}`);
  return Buffer.isBuffer(v) ? v : Buffer.from(v.buffer, v.byteOffset, v.byteLength);
}

function isChunkSize(n: number): boolean {
  return n >= MIN_CHUNK_SIZE && n <= MAX_CHUNK_SIZE && (n & (n - 1)) === 0;
}

/** The volume from the context, both or neither (a context with one of them is a bug). */
function volumeOf(ctx: DecodeContext): { size: number; cs: number } | null {
  const { volumeSize: size, chunkSize: cs } = ctx;
  if (size === undefined && cs === undefined) return null;
  if (size === undefined || cs === undefined || !Number.isSafeInteger(size) || size < 1 || !isChunkSize(cs)) {
    throw new TmError(ErrorCodes.INTERNAL, `decode context is inconsistent: volumeSize ${size}, chunkSize ${cs}`);
  }
  return { size, cs };
}

/**
 * A cursor (bytes) inside the volume: at most its size, and on a chunk boundary
 * unless it is the end of the volume (the secondary's cursor is the end of the
 * last extent applied, which is the volume's end after a tail extent).
 */
function checkCursor(t: string, k: string, v: number, vol: { size: number; cs: number } | null): void {
  if (!vol) return;
  if (v > vol.size) fail(`${t}.${k} ${v} is beyond the end of the volume (${vol.size} bytes)`);
  if (v % vol.cs !== 0 && v !== vol.size) fail(`${t}.${k} ${v} is not a multiple of the chunk size ${vol.cs}`);
}

/** Validate a decoded value; returns a fresh message holding only the known fields. */
function validate(v: unknown, mode: Mode): Message {
  if (!isPlain(v)) fail(`a frame must hold a map, got ${describe(v)}`);
  const t = v.type;
  if (t === undefined) fail('a frame must have a type field');
  if (typeof t !== 'string') fail(`the type field must be a string, got ${describe(t)}`);
  switch (t) {
    case 'hello':
      checkKeys(v, t, ['type', 'version', 'node', 'mirror', 'nonce']);
      return { type: t, version: uint(v, t, 'version', 1), node: name(v, t, 'node'), mirror: name(v, t, 'mirror'), nonce: bytes(v, t, 'nonce', NONCE_BYTES) };
    case 'challenge':
      checkKeys(v, t, ['type', 'version', 'node', 'nonce', 'proof']);
      return {
        type: t,
        version: uint(v, t, 'version', 1),
        node: name(v, t, 'node'),
        nonce: bytes(v, t, 'nonce', NONCE_BYTES),
        proof: bytes(v, t, 'proof', PROOF_BYTES),
      };
    case 'auth': {
      checkKeys(v, t, ['type', 'proof', 'volumeSize', 'chunkSize', 'volumeId'], ['fresh']);
      const proof = bytes(v, t, 'proof', PROOF_BYTES);
      const volumeSize = uint(v, t, 'volumeSize', 1);
      const chunkSize = uint(v, t, 'chunkSize', 1);
      if (!isChunkSize(chunkSize)) fail(`auth.chunkSize ${chunkSize} is not a power of two from ${MIN_CHUNK_SIZE} to ${MAX_CHUNK_SIZE}`);
      const id = v.volumeId;
      if (typeof id !== 'string' || id.length < 1 || id.length > VOLUME_ID_MAX || !VOLUME_ID_RE.test(id)) {
        fail(`auth.volumeId must be 1..${VOLUME_ID_MAX} lowercase hex digits, got ${describe(id)}`);
      }
      if (Object.hasOwn(v, 'fresh') && typeof v.fresh !== 'boolean') fail(`auth.fresh must be a boolean, got ${describe(v.fresh)}`);
      return { type: t, proof, volumeSize, chunkSize, volumeId: id, ...(v.fresh === true ? { fresh: true } : {}) };
    }
    case 'ready': {
      checkKeys(v, t, ['type', 'committedGeneration', 'applying']);
      const committedGeneration = uint(v, t, 'committedGeneration');
      const a = v.applying;
      if (a === null) return { type: t, committedGeneration, applying: null };
      if (!isPlain(a)) fail(`ready.applying must be null or a map, got ${describe(a)}`);
      const at = 'ready.applying';
      checkKeys(a, at, ['generation', 'cursor']);
      const applying = { generation: uint(a, at, 'generation', 1), cursor: uint(a, at, 'cursor') };
      checkCursor(at, 'cursor', applying.cursor, volumeOf(mode.ctx));
      return { type: t, committedGeneration, applying };
    }
    case 'begin': {
      checkKeys(v, t, ['type', 'generation', 'resumeFrom']);
      const generation = uint(v, t, 'generation', 1);
      const resumeFrom = uint(v, t, 'resumeFrom');
      checkCursor(t, 'resumeFrom', resumeFrom, volumeOf(mode.ctx));
      return { type: t, generation, resumeFrom };
    }
    case 'extent':
      return validateExtent(v, mode);
    case 'commit':
    case 'committed':
      checkKeys(v, t, ['type', 'generation']);
      return { type: t, generation: uint(v, t, 'generation', 1) };
    case 'ack': {
      checkKeys(v, t, ['type', 'seq', 'durable']);
      const seq = uint(v, t, 'seq');
      const durable = uint(v, t, 'durable');
      checkCursor(t, 'durable', durable, volumeOf(mode.ctx));
      return { type: t, seq, durable };
    }
    case 'digest-req':
    case 'digests': {
      checkKeys(v, t, t === 'digests' ? ['type', 'offset', 'length', 'digests'] : ['type', 'offset', 'length']);
      const offset = uint(v, t, 'offset');
      const length = uint(v, t, 'length', 1);
      if (length > MAX_DIGEST_RANGE) fail(`${t}.length ${length} exceeds ${MAX_DIGEST_RANGE} bytes`);
      const vol = volumeOf(mode.ctx);
      if (vol) checkRange(t, offset, length, vol);
      else if (mode.needVolume) fail(`${t} before the handshake settled the volume`);
      if (t === 'digest-req') return { type: t, offset, length };
      const digests = bytes(v, t, 'digests');
      const want = vol ? Math.ceil(length / vol.cs) * DIGEST_BYTES : null;
      if (want !== null ? digests.length !== want : digests.length % DIGEST_BYTES !== 0) {
        fail(`digests.digests holds ${digests.length} bytes, expected ${want ?? `a multiple of ${DIGEST_BYTES}`}`);
      }
      return { type: t, offset, length, digests };
    }
    case 'error': {
      checkKeys(v, t, ['type', 'code', 'message']);
      const code = v.code;
      if (typeof code !== 'string' || code.length > CODE_MAX || !CODE_RE.test(code)) fail(`error.code must match ${CODE_RE}, got ${describe(code)}`);
      const message = v.message;
      if (typeof message !== 'string' || message.length > MAX_ERROR_MESSAGE) {
        fail(`error.message must be a string of at most ${MAX_ERROR_MESSAGE} characters, got ${typeof message === 'string' ? `${message.length} characters` : describe(message)}`);
      }
      return { type: t, code, message };
    }
    default:
      fail(`unknown frame type ${describe(t)}`);
  }
}

/** [offset, offset + length) is chunk-aligned inside the volume (the tail may end at its size). */
function checkRange(t: string, offset: number, length: number, { size, cs }: { size: number; cs: number }): void {
  if (offset % cs !== 0) fail(`${t}.offset ${offset} is not a multiple of the chunk size ${cs}`);
  // Subtraction, not offset + length: the sum of two safe integers may not be one.
  if (offset >= size) fail(`${t}.offset ${offset} is beyond the end of the volume (${size} bytes)`);
  if (length > size - offset) fail(`${t}.length ${length} at offset ${offset} reaches beyond the end of the volume (${size} bytes)`);
  if (length % cs !== 0 && length !== size - offset) {
    fail(`${t}.length ${length} is not a multiple of the chunk size ${cs} and the range does not end the volume (${size} bytes)`);
  }
}

const DATA_KEYS = ['type', 'seq', 'kind', 'offset', 'length', 'codec', 'crc32c', 'payload'] as const;
const EMPTY_KEYS = ['type', 'seq', 'kind', 'offset', 'length'] as const;

function validateExtent(o: Obj, mode: Mode): ExtentMsg {
  const t = 'extent';
  const kind = o.kind;
  if (kind !== 'data' && kind !== 'zero' && kind !== 'trim') fail(`extent.kind must be data, zero or trim, got ${describe(kind)}`);
  if (kind !== 'data') {
    for (const k of ['codec', 'crc32c', 'payload']) if (Object.hasOwn(o, k)) fail(`extent.${k} is not allowed on a ${kind} extent`);
  }
  checkKeys(o, t, kind === 'data' ? DATA_KEYS : EMPTY_KEYS);
  const seq = uint(o, t, 'seq', 1);
  const offset = uint(o, t, 'offset');
  const length = uint(o, t, 'length', 1);
  const vol = volumeOf(mode.ctx);
  if (vol) {
    checkRange(t, offset, length, vol);
  } else if (mode.needVolume) {
    fail('extent before the handshake settled the volume');
  } else if (offset % MIN_CHUNK_SIZE !== 0) {
    fail(`extent.offset ${offset} is not a multiple of ${MIN_CHUNK_SIZE}, the smallest chunk size`);
  }
  if (kind !== 'data') return { type: t, seq, kind, offset, length };

  if (length > MAX_EXTENT_BYTES) fail(`extent.length ${length} of a data extent exceeds ${MAX_EXTENT_BYTES} bytes`);
  const codec = o.codec;
  if (codec !== 'raw' && codec !== 'lz4') fail(`extent.codec must be raw or lz4, got ${describe(codec)}`);
  const crc = o.crc32c;
  if (typeof crc !== 'number' || !Number.isInteger(crc) || crc < 0 || crc > 0xffffffff) fail(`extent.crc32c must be an unsigned 32-bit integer, got ${describe(crc)}`);
  const payload = bytes(o, t, 'payload');
  if (codec === 'raw') {
    if (payload.length !== length) fail(`extent.payload holds ${payload.length} bytes, a raw payload holds length (${length}) bytes`);
  } else {
    checkLz4(payload, length);
  }
  return { type: t, seq, kind, offset, length, codec, crc32c: crc === 0 ? 0 : crc, payload };
}

/**
 * An lz4 payload is the uncompressed length (uint32 LE) and one lz4 block, and is
 * smaller than the data (else it travels raw). The announced length bounds what
 * decompression allocates, so it must be `length` exactly (no lz4 bomb).
 */
function checkLz4(payload: Buffer, length: number): void {
  if (payload.length <= LZ4_PREFIX_BYTES || payload.length >= length) {
    fail(`extent.payload of ${payload.length} bytes cannot be lz4 of length ${length}: it must hold ${LZ4_PREFIX_BYTES + 1}..${length - 1} bytes`);
  }
  const announced = payload.readUInt32LE(0);
  if (announced !== length) fail(`extent.payload announces ${announced} lz4 bytes, length is ${length}`);
}

/**
 * Encode one message as a binary frame (a msgpack map). Validates it first, so
 * that a bug on this side never reaches the wire; ranges are checked against
 * `ctx` when given (`Session.send` gives none: the sender knows its own volume).
 *
 * The returned Buffer is a view into msgpackr's output buffer; later calls never
 * write over it.
 *
 * @throws TmError TM_ERR_INTERNAL when the message is invalid.
 */
export function encode(msg: Message, ctx: DecodeContext = {}): Buffer {
  let checked: Message;
  try {
    checked = validate(msg, { ctx, needVolume: false });
  } catch (e) {
    if (e instanceof Invalid) {
      const type = isPlain(msg) && typeof msg.type === 'string' ? msg.type.slice(0, 40) : 'untyped';
      throw new TmError(ErrorCodes.INTERNAL, `refusing to send an invalid ${type} frame: ${e.message}`);
    }
    throw e;
  }
  return packr.pack(checked);
}

/**
 * Decode and validate one frame. `ctx` holds what the handshake settled (volume
 * and chunk size); extents need it. The returned message holds only the known
 * fields; a data payload is a view into `frame` (no copy).
 *
 * @throws TmError TM_ERR_PROTOCOL when the frame is not exactly one msgpack value
 *   (garbage, truncated, trailing bytes) or fails validation; the message names
 *   the message type and the field.
 */
export function decode(frame: Buffer, ctx: DecodeContext): Message {
  let value: unknown;
  let end = -1;
  try {
    // unpackMultiple stopped after the first value, instead of unpack: on trailing
    // bytes, unpack JSON-stringifies the value for its error message, which takes
    // seconds for an 8 MiB payload (a cheap way to stall the event loop).
    packr.unpackMultiple(frame, (v: unknown, _start?: number, stop?: number) => {
      value = v;
      end = stop ?? -1;
      return false;
    });
  } catch (e) {
    const why = e instanceof Error ? e.message : String(e);
    throw new TmError(ErrorCodes.PROTOCOL, `undecodable frame of ${frame.length} bytes: ${why.slice(0, 200)}`);
  }
  if (end !== frame.length) {
    throw new TmError(ErrorCodes.PROTOCOL, end < 0 ? `empty frame` : `frame of ${frame.length} bytes has ${frame.length - end} trailing bytes after its message`);
  }
  try {
    return validate(value, { ctx, needVolume: true });
  } catch (e) {
    if (e instanceof Invalid) throw new TmError(ErrorCodes.PROTOCOL, e.message);
    if (e instanceof TmError) throw e;
    // A value no check anticipated (an exotic object from an extension type).
    throw new TmError(ErrorCodes.PROTOCOL, `invalid frame: ${e instanceof Error ? e.message : String(e)}`);
  }
}

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
 * addon, upstream liblz4). lz4 is kept only when strictly smaller than `raw`;
 * otherwise the payload is `raw` itself (no copy). The lz4 bytes go to the
 * start of `into` when given (it must not overlap `raw`, and must stay
 * untouched while the payload is in use), else to a new buffer; a compressed
 * payload never needs more than `raw.length` bytes.
 */
export async function compressPayload(raw: Buffer, into?: Buffer): Promise<PreparedPayload> {
  const dst = into && into.length >= raw.length ? into : Buffer.allocUnsafe(raw.length);
  const [n, crc] = await native().lz4CompressCrc(raw, dst);
  return n > 0 ? { codec: 'lz4', payload: dst.subarray(0, n), crc32c: crc } : { codec: 'raw', payload: raw, crc32c: crc };
}

/**
 * The uncompressed bytes of a data extent, checked against its CRC-32C: the
 * payload itself for `raw`; for `lz4`, the start of `scratch` when it holds
 * `length` bytes (the caller must be done with what it held before), else one
 * new buffer. lz4 is decoded by the native addon straight into that buffer.
 * Nothing of a payload that fails must be written.
 *
 * @throws TmError TM_ERR_CHECKSUM when the bytes do not match `crc32c` or lz4
 *   yields another length than `length`; TM_ERR_PROTOCOL when the lz4 payload
 *   is not lz4; TM_ERR_INTERNAL when called on a zero or trim extent.
 */
export function decompressPayload(msg: ExtentMsg, scratch?: Buffer): Buffer {
  const where = `extent at offset ${msg.offset}, length ${msg.length}`;
  if (msg.kind !== 'data' || !msg.payload || msg.crc32c === undefined) throw new TmError(ErrorCodes.INTERNAL, `${where}: a ${msg.kind} extent without a payload has nothing to decompress`);
  let raw: Buffer;
  if (msg.codec === 'lz4') {
    let n: number;
    try {
      // Also checked by decode; repeated because the prefix bounds the output.
      checkLz4(msg.payload, msg.length);
      raw = scratch && scratch.length >= msg.length ? scratch.subarray(0, msg.length) : Buffer.allocUnsafe(msg.length);
      n = native().lz4DecompressInto(msg.payload.subarray(LZ4_PREFIX_BYTES), raw);
    } catch (e) {
      throw new TmError(ErrorCodes.PROTOCOL, `${where}: the lz4 payload does not decompress: ${e instanceof Error ? e.message : String(e)}`);
    }
    if (n < 0) throw new TmError(ErrorCodes.PROTOCOL, `${where}: the lz4 payload does not decompress: malformed lz4 block or more than ${msg.length} bytes`);
    if (n !== msg.length) throw new TmError(ErrorCodes.CHECKSUM, `${where}: the lz4 payload decompresses to ${n} bytes; nothing written`);
  } else {
    raw = msg.payload;
    if (raw.length !== msg.length) throw new TmError(ErrorCodes.CHECKSUM, `${where}: the raw payload holds ${raw.length} bytes; nothing written`);
  }
  if (crc32c(raw) !== msg.crc32c) throw new TmError(ErrorCodes.CHECKSUM, `${where}: the payload does not match its CRC-32C; nothing written`);
  return raw;
}

/** A data extent of `raw` at `offset` (bytes): lz4 when that is smaller, CRC-32C of `raw`. */
export async function makeDataExtent(seq: number, offset: number, raw: Buffer): Promise<ExtentMsg> {
  const { codec, payload, crc32c } = await compressPayload(raw);
  return { type: 'extent', seq, kind: 'data', offset, length: raw.length, codec, crc32c, payload };
}
