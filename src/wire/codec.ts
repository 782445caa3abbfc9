import { Packr } from 'msgpackr';
import { ErrorCodes, TmError } from '../errors.js';
import { lz4PayloadProblem } from './lz4-block.js';
import {
  DIGEST_BYTES,
  MAX_DIGEST_RANGE,
  MAX_ERROR_MESSAGE,
  MAX_DIVERGENT_BYTES,
  MAX_EXTENT_BYTES,
  MAX_EXTENT_RUNS,
  MAX_HISTORY_WIRE,
  MAX_NAME_LENGTH,
  NONCE_BYTES,
  PROOF_BYTES,
  type DecodeContext,
  type ExtentMsg,
  dataBytes,
  type Message,
  type WireGenId,
} from './messages.js';

/**
 * The pure codec of protocol v3 (docs/protocol.md): messages to msgpack maps and
 * back. No I/O. Every field of every incoming frame is checked (type, range,
 * offset + length inside the volume) before anything acts on it; a violation is
 * a TmError(TM_ERR_PROTOCOL) whose message names the message type and the field
 * (`extent.offset 12345 is not a multiple of the chunk size 65536`). Outgoing
 * messages pass the same checks, so that a bug on this side never reaches the
 * wire (TM_ERR_INTERNAL).
 *
 * Copies: a decoded data extent's `payload` is a view into the frame, not a copy
 * (payload.ts's decompressPayload returns that same view for `raw`). A frame must
 * therefore not be reused while its message is alive (ws hands out a fresh Buffer
 * per message).
 */

/** Smallest and largest chunk size, bytes. Every chunk size is a multiple of the smallest. */
export const MIN_CHUNK_SIZE = 4096;
export const MAX_CHUNK_SIZE = 4 * 1024 * 1024;

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
      checkKeys(v, t, ['type', 'generation', 'resumeFrom'], ['gid', 'withPeerChanges', 'viewAt']);
      const generation = uint(v, t, 'generation', 1);
      const resumeFrom = uint(v, t, 'resumeFrom');
      checkCursor(t, 'resumeFrom', resumeFrom, volumeOf(mode.ctx));
      const gid = Object.hasOwn(v, 'gid') ? genId(v.gid, 'begin.gid') : undefined;
      if (gid && gid.generation !== generation) fail(`begin.gid.generation ${gid.generation} is not begin.generation ${generation}`);
      if (Object.hasOwn(v, 'withPeerChanges') && typeof v.withPeerChanges !== 'boolean') fail(`begin.withPeerChanges must be a boolean, got ${describe(v.withPeerChanges)}`);
      const viewAt = Object.hasOwn(v, 'viewAt') ? uint(v, t, 'viewAt') : undefined;
      return { type: t, generation, resumeFrom, ...(gid ? { gid } : {}), ...(v.withPeerChanges === true ? { withPeerChanges: true } : {}), ...(viewAt !== undefined ? { viewAt } : {}) };
    }
    case 'history': {
      checkKeys(v, t, ['type', 'role', 'ids', 'pending', 'changedBytes', 'divergent', 'unknown']);
      if (v.role !== 'primary' && v.role !== 'secondary') fail(`history.role must be "primary" or "secondary", got ${describe(v.role)}`);
      const ids = v.ids;
      if (!Array.isArray(ids) || ids.length > MAX_HISTORY_WIRE) fail(`history.ids must be an array of at most ${MAX_HISTORY_WIRE} entries, got ${Array.isArray(ids) ? `${ids.length} entries` : describe(ids)}`);
      const chain = ids.map((g, i) => genId(g, `history.ids[${i}]`));
      const pending = v.pending === null ? null : genId(v.pending, 'history.pending');
      const changedBytes = v.changedBytes === null ? null : uint(v, t, 'changedBytes');
      let divergent: Buffer | null = null;
      if (v.divergent !== null) {
        divergent = bytes(v, t, 'divergent');
        if (divergent.length > MAX_DIVERGENT_BYTES) fail(`history.divergent holds ${divergent.length} bytes, more than ${MAX_DIVERGENT_BYTES}`);
      }
      if (typeof v.unknown !== 'boolean') fail(`history.unknown must be a boolean, got ${describe(v.unknown)}`);
      return { type: t, role: v.role, ids: chain, pending, changedBytes, divergent, unknown: v.unknown };
    }
    case 'switchover':
    case 'switched':
      checkKeys(v, t, ['type', 'generation']);
      return { type: t, generation: uint(v, t, 'generation', 1) };
    case 'unchanged':
      checkKeys(v, t, ['type', 'generation', 'viewAt']);
      return { type: t, generation: uint(v, t, 'generation', 1), viewAt: uint(v, t, 'viewAt') };
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

/** A generation identity: { node, generation >= 1, id: 16 hex digits }. */
function genId(g: unknown, t: string): WireGenId {
  if (!isPlain(g)) fail(`${t} must be a map, got ${describe(g)}`);
  checkKeys(g, t, ['node', 'generation', 'id']);
  const id = g.id;
  if (typeof id !== 'string' || !GEN_ID_RE.test(id)) fail(`${t}.id must be 16 lowercase hex digits, got ${describe(id)}`);
  return { node: name(g, t, 'node'), generation: uint(g, t, 'generation', 1), id };
}
const GEN_ID_RE = /^[0-9a-f]{16}$/;

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
const DATA_OPTIONAL_KEYS = ['runs'] as const;
const EMPTY_KEYS = ['type', 'seq', 'kind', 'offset', 'length'] as const;

function validateExtent(o: Obj, mode: Mode): ExtentMsg {
  const t = 'extent';
  const kind = o.kind;
  if (kind !== 'data' && kind !== 'zero' && kind !== 'trim') fail(`extent.kind must be data, zero or trim, got ${describe(kind)}`);
  if (kind !== 'data') {
    for (const k of ['codec', 'crc32c', 'payload', 'runs']) if (Object.hasOwn(o, k)) fail(`extent.${k} is not allowed on a ${kind} extent`);
  }
  checkKeys(o, t, kind === 'data' ? DATA_KEYS : EMPTY_KEYS, kind === 'data' ? DATA_OPTIONAL_KEYS : []);
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

  const runs = Object.hasOwn(o, 'runs') ? checkRuns(o.runs, offset, length, vol) : undefined;
  const bytesHeld = runs ? dataBytes({ length, runs }) : length;
  if (bytesHeld > MAX_EXTENT_BYTES) {
    fail(runs ? `extent.runs hold ${bytesHeld} bytes, more than the ${MAX_EXTENT_BYTES} of a data extent` : `extent.length ${length} of a data extent exceeds ${MAX_EXTENT_BYTES} bytes`);
  }
  const codec = o.codec;
  if (codec !== 'raw' && codec !== 'lz4') fail(`extent.codec must be raw or lz4, got ${describe(codec)}`);
  const crc = o.crc32c;
  if (typeof crc !== 'number' || !Number.isInteger(crc) || crc < 0 || crc > 0xffffffff) fail(`extent.crc32c must be an unsigned 32-bit integer, got ${describe(crc)}`);
  const payload = bytes(o, t, 'payload');
  if (codec === 'raw') {
    if (payload.length !== bytesHeld) fail(`extent.payload holds ${payload.length} bytes, a raw payload holds ${runs ? 'the bytes of its runs' : 'length'} (${bytesHeld}) bytes`);
  } else {
    const why = lz4PayloadProblem(payload, bytesHeld);
    if (why) fail(why);
  }
  // The payload last: encodeParts relies on it.
  return runs
    ? { type: t, seq, kind, offset, length, codec, crc32c: crc === 0 ? 0 : crc, runs, payload }
    : { type: t, seq, kind, offset, length, codec, crc32c: crc === 0 ? 0 : crc, payload };
}

/**
 * A data extent's `runs`: 2 to MAX_EXTENT_RUNS pieces as [start, length, ...]
 * relative to `offset`, ascending and apart, the first at 0, the last ending
 * at `length`; with the volume known, each piece starts on a chunk and ends
 * on one or at the volume's end.
 */
function checkRuns(v: unknown, offset: number, length: number, vol: { size: number; cs: number } | null): number[] {
  const t = 'extent.runs';
  if (!Array.isArray(v)) fail(`${t} must be an array of integers, got ${describe(v)}`);
  if (v.length < 4 || v.length > 2 * MAX_EXTENT_RUNS || v.length % 2 !== 0) {
    fail(`${t} must hold 2 to ${MAX_EXTENT_RUNS} pieces as start, length pairs, got ${v.length} numbers`);
  }
  const out: number[] = new Array<number>(v.length);
  let end = 0;
  for (let i = 0; i < v.length; i += 2) {
    const start = v[i] as unknown;
    const len = v[i + 1] as unknown;
    if (typeof start !== 'number' || !Number.isSafeInteger(start) || start < 0 || typeof len !== 'number' || !Number.isSafeInteger(len) || len < 1) {
      fail(`${t}: piece ${i / 2} must be a start and a length >= 1 (integers), got ${describe(start)}, ${describe(len)}`);
    }
    if (i === 0 ? start !== 0 : start < end) fail(`${t}: piece ${i / 2} starts at ${start}, ${i === 0 ? 'the first must start at 0' : `before the end of the previous one (${end})`}`);
    if (len > length - start) fail(`${t}: piece ${i / 2} (${start}+${len}) reaches beyond the extent's length ${length}`);
    end = start + len;
    if (vol && (offset + start) % vol.cs !== 0) fail(`${t}: piece ${i / 2} starts at ${offset + start}, not a multiple of the chunk size ${vol.cs}`);
    if (vol && end !== length && (offset + end) % vol.cs !== 0) fail(`${t}: piece ${i / 2} ends at ${offset + end}, not a multiple of the chunk size ${vol.cs}`);
    out[i] = start === 0 ? 0 : start;
    out[i + 1] = len;
  }
  if (end !== length) fail(`${t}: the last piece ends at ${end}, the extent's length is ${length}`);
  return out;
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
  return packr.pack(check(msg, ctx));
}

/** `msg` validated for sending (TM_ERR_INTERNAL naming the type and field when it is not). */
function check(msg: Message, ctx: DecodeContext): Message {
  try {
    return validate(msg, { ctx, needVolume: false });
  } catch (e) {
    if (e instanceof Invalid) {
      const type = isPlain(msg) && typeof msg.type === 'string' ? msg.type.slice(0, 40) : 'untyped';
      throw new TmError(ErrorCodes.INTERNAL, `refusing to send an invalid ${type} frame: ${e.message}`);
    }
    throw e;
  }
}

/** The bin header msgpack gives a payload of `n` bytes (the smallest form, as msgpackr writes it). */
function binHeader(n: number): Buffer {
  if (n < 0x100) return Buffer.from([0xc4, n]);
  if (n < 0x10000) return Buffer.from([0xc5, n >> 8, n & 0xff]);
  const h = Buffer.allocUnsafe(5);
  h[0] = 0xc6;
  h.writeUInt32BE(n, 1);
  return h;
}

/** Payloads below this are copied into the frame ({@link encodeParts}): a second part costs more than the copy. */
const GATHER_MIN_PAYLOAD = 16 * 1024;
const EMPTY = Buffer.alloc(0);

/**
 * {@link encode}, with a data extent's payload left out of the encoded bytes:
 * `[head, payload]`, whose concatenation is byte for byte what encode gives
 * (the payload is the map's last field, a msgpack bin). The payload is the
 * caller's buffer, not a copy. Other messages, and payloads below 16 KiB:
 * `[encode(msg)]`.
 *
 * @throws TmError TM_ERR_INTERNAL when the message is invalid.
 */
export function encodeParts(msg: Message): [Buffer] | [Buffer, Buffer] {
  if (msg.type !== 'extent' || msg.kind !== 'data' || !msg.payload || msg.payload.length < GATHER_MIN_PAYLOAD) return [encode(msg)];
  const checked = check(msg, {}) as ExtentMsg;
  const payload = checked.payload!;
  // msgpackr writes the empty bin last as c4 00; the payload's own bin header replaces it.
  const empty = packr.pack({ ...checked, payload: EMPTY });
  if (empty.length < 2 || empty[empty.length - 2] !== 0xc4 || empty[empty.length - 1] !== 0) {
    throw new TmError(ErrorCodes.INTERNAL, 'msgpackr did not encode the extent payload as the last field');
  }
  const bin = binHeader(payload.length);
  const head = Buffer.allocUnsafe(empty.length - 2 + bin.length);
  empty.copy(head, 0, 0, empty.length - 2);
  bin.copy(head, empty.length - 2);
  return [head, payload];
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
