import { Packr } from 'msgpackr';
import { compress, uncompressSync } from 'lz4-napi';
import * as zlib from 'node:zlib';
import { ErrorCodes, TmError } from '../errors.js';
import {
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
 * The pure codec of protocol v1: msgpack maps in, validated messages out. No
 * I/O. Every field is checked (type, range, offset + length inside the volume)
 * before anything acts on a message; a violation is a TmError(TM_ERR_PROTOCOL)
 * naming the message type and the field.
 */

const packr = new Packr({ useRecords: false, mapsAsObjects: true, moreTypes: false, int64AsType: 'number' });

const NAME_RE = /^[A-Za-z0-9._-]+$/;
const HEX_RE = /^[0-9a-f]{1,64}$/;
const CODE_RE = /^TM_ERR_[A-Z_]{1,40}$/;

class Invalid extends Error {}

type Obj = Record<string, unknown>;

function fail(msg: string): never {
  throw new Invalid(msg);
}

function checkKeys(o: Obj, t: string, required: string[], optional: string[] = []): void {
  for (const k of required) if (!(k in o)) fail(`${t}.${k} is missing`);
  for (const k of Object.keys(o)) if (!required.includes(k) && !optional.includes(k)) fail(`${t} has an unknown field "${k}"`);
}

function uint(o: Obj, t: string, k: string, min = 0): number {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) fail(`${t}.${k} must be an integer >= ${min}, got ${describe(v)}`);
  return v;
}

function str(o: Obj, t: string, k: string, re: RegExp, max: number): string {
  const v = o[k];
  if (typeof v !== 'string' || v.length < 1 || v.length > max || !re.test(v)) fail(`${t}.${k} must be a string of 1..${max} characters matching ${re}, got ${describe(v)}`);
  return v;
}

function bytes(o: Obj, t: string, k: string, exact?: number): Buffer {
  const v = o[k];
  if (!(v instanceof Uint8Array)) fail(`${t}.${k} must be binary, got ${describe(v)}`);
  const b = Buffer.isBuffer(v) ? v : Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  if (exact !== undefined && b.length !== exact) fail(`${t}.${k} must be ${exact} bytes, got ${b.length}`);
  return b;
}

function describe(v: unknown): string {
  if (v instanceof Uint8Array) return `${v.length} bytes of binary`;
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? v.slice(0, 40) + '...' : v);
  if (typeof v === 'bigint') return `${v}n`;
  if (v === null || v === undefined || typeof v !== 'object') return String(v);
  return Array.isArray(v) ? 'an array' : 'an object';
}

function isChunkSize(n: number): boolean {
  return n >= 4096 && n <= 4 * 1024 * 1024 && (n & (n - 1)) === 0;
}

/** Validate a decoded object; returns it typed as a Message (Uint8Arrays made Buffers). */
function validate(v: unknown, ctx: DecodeContext): Message {
  if (typeof v !== 'object' || v === null || Array.isArray(v) || v instanceof Uint8Array) fail(`a frame must hold a map, got ${describe(v)}`);
  const o = v as Obj;
  const t = o.type;
  if (typeof t !== 'string') fail(`frame has no type`);
  switch (t) {
    case 'hello':
      checkKeys(o, t, ['type', 'version', 'node', 'mirror', 'nonce']);
      return { type: t, version: uint(o, t, 'version', 1), node: str(o, t, 'node', NAME_RE, MAX_NAME_LENGTH), mirror: str(o, t, 'mirror', NAME_RE, MAX_NAME_LENGTH), nonce: bytes(o, t, 'nonce', NONCE_BYTES) };
    case 'challenge':
      checkKeys(o, t, ['type', 'version', 'node', 'nonce', 'proof']);
      return { type: t, version: uint(o, t, 'version', 1), node: str(o, t, 'node', NAME_RE, MAX_NAME_LENGTH), nonce: bytes(o, t, 'nonce', NONCE_BYTES), proof: bytes(o, t, 'proof', PROOF_BYTES) };
    case 'auth': {
      checkKeys(o, t, ['type', 'proof', 'volumeSize', 'chunkSize', 'volumeId']);
      const chunkSize = uint(o, t, 'chunkSize', 1);
      if (!isChunkSize(chunkSize)) fail(`auth.chunkSize ${chunkSize} is not a power of two between 4096 and 4194304`);
      return { type: t, proof: bytes(o, t, 'proof', PROOF_BYTES), volumeSize: uint(o, t, 'volumeSize', 1), chunkSize, volumeId: str(o, t, 'volumeId', HEX_RE, 64) };
    }
    case 'ready': {
      checkKeys(o, t, ['type', 'committedGeneration', 'applying']);
      const a = o.applying;
      let applying: { generation: number; cursor: number } | null = null;
      if (a !== null) {
        if (typeof a !== 'object' || Array.isArray(a) || a instanceof Uint8Array) fail(`ready.applying must be null or a map, got ${describe(a)}`);
        const ao = a as Obj;
        checkKeys(ao, 'ready.applying', ['generation', 'cursor']);
        applying = { generation: uint(ao, 'ready.applying', 'generation', 1), cursor: uint(ao, 'ready.applying', 'cursor') };
        if (ctx.volumeSize !== undefined && applying.cursor > ctx.volumeSize) fail(`ready.applying.cursor ${applying.cursor} is beyond the volume (${ctx.volumeSize} bytes)`);
      }
      return { type: t, committedGeneration: uint(o, t, 'committedGeneration'), applying };
    }
    case 'begin': {
      checkKeys(o, t, ['type', 'generation', 'resumeFrom']);
      const resumeFrom = uint(o, t, 'resumeFrom');
      if (ctx.volumeSize === undefined || ctx.chunkSize === undefined) fail('begin before the handshake settled the volume');
      if (resumeFrom > ctx.volumeSize) fail(`begin.resumeFrom ${resumeFrom} is beyond the volume (${ctx.volumeSize} bytes)`);
      if (resumeFrom % ctx.chunkSize !== 0 && resumeFrom !== ctx.volumeSize) fail(`begin.resumeFrom ${resumeFrom} is not a multiple of the chunk size ${ctx.chunkSize}`);
      return { type: t, generation: uint(o, t, 'generation', 1), resumeFrom };
    }
    case 'extent':
      return validateExtent(o, ctx);
    case 'commit':
      checkKeys(o, t, ['type', 'generation']);
      return { type: t, generation: uint(o, t, 'generation', 1) };
    case 'ack':
      checkKeys(o, t, ['type', 'seq', 'durable']);
      return { type: t, seq: uint(o, t, 'seq'), durable: uint(o, t, 'durable') };
    case 'committed':
      checkKeys(o, t, ['type', 'generation']);
      return { type: t, generation: uint(o, t, 'generation', 1) };
    case 'error': {
      checkKeys(o, t, ['type', 'code', 'message']);
      const code = str(o, t, 'code', CODE_RE, 48);
      const m = o.message;
      if (typeof m !== 'string' || m.length > MAX_ERROR_MESSAGE) fail(`error.message must be a string of at most ${MAX_ERROR_MESSAGE} characters, got ${describe(m)}`);
      return { type: t, code, message: m };
    }
    default:
      fail(`unknown frame type ${describe(t)}`);
  }
}

function validateExtent(o: Obj, ctx: DecodeContext): ExtentMsg {
  const t = 'extent';
  const kind = o.kind;
  if (kind !== 'data' && kind !== 'zero' && kind !== 'trim') fail(`extent.kind must be data, zero or trim, got ${describe(kind)}`);
  if (kind === 'data') checkKeys(o, t, ['type', 'seq', 'kind', 'offset', 'length', 'codec', 'crc32', 'payload']);
  else checkKeys(o, t, ['type', 'seq', 'kind', 'offset', 'length']);
  const seq = uint(o, t, 'seq', 1);
  const offset = uint(o, t, 'offset');
  const length = uint(o, t, 'length', 1);
  const size = ctx.volumeSize;
  const cs = ctx.chunkSize;
  if (size === undefined || cs === undefined) fail('extent before the handshake settled the volume');
  if (offset % cs !== 0) fail(`extent.offset ${offset} is not a multiple of the chunk size ${cs}`);
  if (offset + length > size) fail(`extent ${offset}+${length} reaches beyond the volume (${size} bytes)`);
  if (length % cs !== 0 && offset + length !== size) fail(`extent.length ${length} is not a multiple of the chunk size ${cs} and the extent does not end the volume`);
  if (kind !== 'data') return { type: 'extent', seq, kind, offset, length };
  if (length > MAX_EXTENT_BYTES) fail(`extent.length ${length} of a data extent exceeds ${MAX_EXTENT_BYTES}`);
  const codec = o.codec;
  if (codec !== 'raw' && codec !== 'lz4') fail(`extent.codec must be raw or lz4, got ${describe(codec)}`);
  const crc = o.crc32;
  if (typeof crc !== 'number' || !Number.isInteger(crc) || crc < 0 || crc > 0xffffffff) fail(`extent.crc32 must be an unsigned 32-bit integer, got ${describe(crc)}`);
  const payload = bytes(o, t, 'payload');
  if (codec === 'raw' && payload.length !== length) fail(`extent.payload holds ${payload.length} bytes, raw length is ${length}`);
  if (codec === 'lz4' && (payload.length === 0 || payload.length >= length)) fail(`extent.payload of ${payload.length} bytes cannot be lz4 of ${length} bytes`);
  return { type: 'extent', seq, kind, offset, length, codec, crc32: crc, payload };
}

/** Encode a message; validates it first so that a bug here never reaches the wire. */
export function encode(msg: Message): Buffer {
  try {
    // Our own frames are checked for shape; ranges are the sender's own volume.
    const ctx: DecodeContext =
      msg.type === 'extent' ? { volumeSize: msg.offset + msg.length, chunkSize: 4096 } : msg.type === 'begin' ? { volumeSize: msg.resumeFrom, chunkSize: 4096 } : {};
    validate(msg, ctx);
  } catch (e) {
    if (e instanceof Invalid) throw new TmError(ErrorCodes.INTERNAL, `refusing to send an invalid ${msg.type} frame: ${e.message}`);
    throw e;
  }
  return packr.pack(msg);
}

/** Decode and validate one frame; throws TmError(TM_ERR_PROTOCOL) on anything wrong. */
export function decode(frame: Buffer, ctx: DecodeContext): Message {
  let v: unknown;
  try {
    v = packr.unpack(frame);
  } catch (e) {
    throw new TmError(ErrorCodes.PROTOCOL, `undecodable frame of ${frame.length} bytes: ${(e as Error).message}`);
  }
  try {
    return validate(v, ctx);
  } catch (e) {
    if (e instanceof Invalid) throw new TmError(ErrorCodes.PROTOCOL, e.message);
    throw new TmError(ErrorCodes.PROTOCOL, `invalid frame: ${(e as Error).message}`);
  }
}

/** CRC-32 (zlib polynomial) of a buffer. */
export function crc32(buf: Uint8Array): number {
  return zlib.crc32(buf) >>> 0;
}

/** lz4 (block, size prepended) when strictly smaller than the raw bytes, else raw. */
export async function compressPayload(raw: Buffer): Promise<{ codec: 'raw' | 'lz4'; payload: Buffer }> {
  const c = await compress(raw);
  return c.length < raw.length ? { codec: 'lz4', payload: c } : { codec: 'raw', payload: raw };
}

/** The uncompressed bytes of a data extent, checked against its CRC-32 (TM_ERR_CHECKSUM). */
export function decompressPayload(msg: ExtentMsg): Buffer {
  if (msg.kind !== 'data' || !msg.payload) throw new TmError(ErrorCodes.INTERNAL, `${msg.kind} extent has no payload`);
  let raw: Buffer;
  if (msg.codec === 'lz4') {
    try {
      raw = uncompressSync(msg.payload);
    } catch (e) {
      throw new TmError(ErrorCodes.PROTOCOL, `extent ${msg.offset}+${msg.length}: lz4 payload does not decompress: ${(e as Error).message}`);
    }
    if (raw.length !== msg.length) throw new TmError(ErrorCodes.PROTOCOL, `extent ${msg.offset}+${msg.length}: lz4 payload decompresses to ${raw.length} bytes`);
  } else {
    raw = msg.payload;
  }
  if (crc32(raw) !== msg.crc32) throw new TmError(ErrorCodes.CHECKSUM, `extent ${msg.offset}+${msg.length}: payload does not match its CRC-32; nothing written`);
  return raw;
}

/** Build a data extent for `raw` at `offset` (compressed when that helps). */
export async function makeDataExtent(seq: number, offset: number, raw: Buffer): Promise<ExtentMsg> {
  const { codec, payload } = await compressPayload(raw);
  return { type: 'extent', seq, kind: 'data', offset, length: raw.length, codec, crc32: crc32(raw), payload };
}
