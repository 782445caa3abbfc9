/**
 * Model-checked fuzzing of a secondary (issue 14 §5).
 *
 * A real secondary Mirror (MemoryVolume target, state files in a temp dir)
 * takes sessions over the in-memory session pair; this file plays the
 * primary. Each session it authenticates genuinely, then sends a burst of
 * frames made from a valid message sequence (begin, ascending extents,
 * commit, digest requests, a second generation) mutated from a seed: field
 * changes (offsets off the chunk grid or beyond the volume, wrong lengths,
 * generations, seqs, kinds, codecs, CRCs, the runs of a data extent holding
 * several pieces, missing and unknown fields, other
 * types), sequence changes (reorder, duplicate, drop, foreign frames) and byte
 * changes (bit flips, truncation, trailing bytes).
 *
 * A reference model holds what a correct secondary may do with those frames:
 * frames are taken in order; the first one that breaks a rule ends the
 * session with a coded error and nothing of it (or after it) is written.
 * Because a session ends asynchronously, a correct secondary may have applied
 * any prefix of the valid frames that is at least what it acknowledged; the
 * check after each session is that the replica's bytes, its committed
 * generation and its `applying` record equal the model after one such prefix,
 * that every answer (ack, committed, digests) is the one the model expects,
 * in order, that the session ended with one of the codes the model allows,
 * and that the next handshake's `ready` tells the same. The model then goes
 * on from that prefix. A shadow copy (the model's bytes) is compared with the
 * replica after every session.
 *
 * `npm run fuzz -- --frames N --seed S [--consistency off|journal] [--verbose]`
 * runs a campaign; test/unit/fuzz-secondary.test.ts runs a short one in `npm test`.
 */
import { createHash } from 'node:crypto';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Packr } from 'msgpackr';
import { pino } from 'pino';
import { ErrorCodes, TmError } from '../../src/errors.js';
import { serveSession } from '../../src/mirror/mirror.js';
import type { Applying, MirrorState } from '../../src/mirror/state.js';
import { native } from '../../src/native/index.js';
import { prng, textLike } from '../../src/util/sample.js';
import { chunkDigest, DIGEST_BYTES } from '../../src/volume/digest.js';
import type { MemoryVolume } from '../../src/volume/memory.js';
import { decode } from '../../src/wire/codec.js';
import { primaryHandshake } from '../../src/wire/handshake.js';
import { memorySessionPair } from '../../src/wire/memory.js';
import type { Message } from '../../src/wire/messages.js';
import { compressPayload } from '../../src/wire/payload.js';
import type { Session } from '../../src/wire/session.js';
import { MemoryMirrorPair, PSK } from '../helpers/mirror-pair.js';

const CS = 4096;
const KiB = 1024;
/** Of the volume: 48 chunks and a short tail chunk. */
const DEFAULT_SIZE = 48 * CS + 1000;
const VOLUME_ID = 'f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0';

export interface FuzzOptions {
  /** Fuzzed frames to send in all (handshake frames not counted). */
  frames: number;
  seed: number;
  consistency?: 'off' | 'journal';
  size?: number;
  /** Progress and findings, one line each. */
  log?: (line: string) => void;
  /** Negative control: called after session `session` ended and before the check (e.g. to corrupt the replica). */
  sabotage?: { session: number; run(target: MemoryVolume): Promise<void> };
}

export interface FuzzReport {
  seed: number;
  frames: number;
  sessions: number;
  /** Sessions that ended because of a frame the model refuses, by the code the secondary gave. */
  endedBy: Record<string, number>;
  /** Frames the model applied (begin, extents, commit, digest-req) and among them the commits. */
  applied: number;
  commits: number;
  digestAnswers: number;
  restarts: number;
  /** What the check found wrong; empty when the secondary did only what the model allows. */
  failures: string[];
  seconds: number;
}

/** msgpack like the codec's (no records, maps as objects), without its validation: the fuzzer writes invalid frames on purpose. */
const packr = new Packr({ useRecords: false, mapsAsObjects: true, structuredClone: false, moreTypes: false, bundleStrings: false });

type Obj = Record<string, unknown>;

/**
 * How a fuzzed frame reaches the secondary: straight into the primary's end
 * of the link, as bytes, below Session.send (which validates, and would refuse
 * most of them). Should the session layer ever add per-frame authentication,
 * this is the one place that applies it (Session.sendEncoded adds the MAC).
 */
function sendRaw(session: Session, frame: Buffer): void {
  session.sendEncoded(frame);
}

/** The replica as the model sees it after some prefix of a session's frames. */
interface ModelState {
  content: Buffer;
  committed: number;
  applying: Applying | null;
  /** Generation open in this session (null between generations), where the next extent may start, and the cursor last made durable. */
  current: number | null;
  nextOffset: number;
  durable: number;
  /** The last extent number of the open generation (they must go up). */
  lastSeq: number;
}

function cloneState(s: ModelState): ModelState {
  return { ...s, content: Buffer.from(s.content), applying: s.applying ? { ...s.applying } : null };
}

/** What the record says once the session has ended at this point (the receiver's end-of-session checkpoint). */
function recordAtEnd(s: ModelState): Applying | null {
  if (s.current !== null && s.nextOffset > s.durable) return { generation: s.current, cursor: s.nextOffset };
  return s.applying ? { ...s.applying } : null;
}

type Answer = { type: 'ack'; seq: number } | { type: 'committed'; generation: number } | { type: 'digests'; offset: number; length: number; digests: Buffer };

/** The verdict of the model on one frame. */
type Step =
  | { ok: true; answer: Answer | null }
  | { ok: false; code: string; why: string; /** the session layer refuses it on arrival, before earlier frames are applied */ onArrival: boolean };

function digestsOf(content: Buffer, offset: number, length: number): Buffer {
  const out = Buffer.alloc(Math.ceil(length / CS) * DIGEST_BYTES);
  for (let at = 0, i = 0; at < length; at += CS, i++) chunkDigest(content.subarray(offset + at, offset + Math.min(at + CS, length)), out, i * DIGEST_BYTES);
  return out;
}

/**
 * The model of a correct secondary, frame by frame (docs/protocol.md). It
 * uses the codec's decode as the judge of a frame's shape, and checks that
 * what decode accepts obeys the range rules on its own; everything after
 * decode (order, generations, payloads, what is written) is the model's.
 */
function modelStep(s: ModelState, frame: Buffer, size: number): Step {
  let msg: Message;
  try {
    msg = decode(frame, { volumeSize: size, chunkSize: CS });
  } catch (e) {
    return { ok: false, code: (e as TmError).code ?? 'undecodable', why: `decode: ${(e as Error).message}`, onArrival: true };
  }
  const bad = (why: string, code: string = ErrorCodes.PROTOCOL): Step => ({ ok: false, code, why, onArrival: false });
  switch (msg.type) {
    case 'error':
      // The peer said it is done: the secondary ends the session, the primary sees a normal close.
      return { ok: false, code: ErrorCodes.CONNECTION, why: 'error frame', onArrival: true };
    case 'begin': {
      if (msg.resumeFrom > size || (msg.resumeFrom % CS !== 0 && msg.resumeFrom !== size)) throw new Error(`codec accepted begin.resumeFrom ${msg.resumeFrom}`);
      if (s.current !== null) return bad(`begin while ${s.current} is open`);
      if (msg.generation <= s.committed) return bad(`begin(${msg.generation}) at or below committed ${s.committed}`);
      const a = s.applying;
      if (msg.resumeFrom > 0 && (!a || a.generation !== msg.generation || msg.resumeFrom > a.cursor)) return bad(`resume from ${msg.resumeFrom} beyond what is durable`);
      s.current = msg.generation;
      s.nextOffset = s.durable = msg.resumeFrom;
      s.lastSeq = 0;
      if (!a || a.generation !== msg.generation) s.applying = { generation: msg.generation, cursor: msg.resumeFrom };
      return { ok: true, answer: null };
    }
    case 'extent': {
      const { offset, length } = msg;
      if (offset % CS !== 0 || length < 1 || length > size - offset || (length % CS !== 0 && offset + length !== size)) throw new Error(`codec accepted extent ${offset}+${length}`);
      if (s.current === null) return bad('extent outside a generation');
      if (offset < s.nextOffset) return bad(`extent at ${offset} below ${s.nextOffset}`);
      if (msg.seq <= s.lastSeq) return bad(`extent ${msg.seq} after ${s.lastSeq}`);
      s.lastSeq = msg.seq;
      if (msg.kind === 'data') {
        const payload = msg.payload!;
        // The pieces the payload holds: the whole range, or its runs (checked here on their own, as the ranges above).
        const pieces: [number, number][] = [];
        if (msg.runs) {
          const r = msg.runs;
          if (r.length < 4 || r.length % 2 !== 0 || r[0] !== 0) throw new Error(`codec accepted runs ${JSON.stringify(r)}`);
          for (let i = 0; i < r.length; i += 2) {
            const at = offset + r[i]!;
            const end = at + r[i + 1]!;
            if (r[i + 1]! < 1 || (i > 0 && at < pieces[pieces.length - 1]![1]) || at % CS !== 0 || (end % CS !== 0 && end !== size)) throw new Error(`codec accepted runs ${JSON.stringify(r)} at ${offset}`);
            pieces.push([at, end]);
          }
          if (pieces[pieces.length - 1]![1] !== offset + length) throw new Error(`codec accepted runs ${JSON.stringify(r)} ending short of ${offset}+${length}`);
        } else {
          pieces.push([offset, offset + length]);
        }
        const bytes = pieces.reduce((n, [a, b]) => n + b - a, 0);
        let raw: Buffer;
        if (msg.codec === 'lz4') {
          raw = Buffer.alloc(bytes);
          const n = payload.length > 4 && payload.readUInt32LE(0) === bytes ? native().lz4DecompressInto(payload.subarray(4), raw) : -1;
          if (n < 0) return bad('lz4 does not decompress');
          if (n !== bytes) return bad(`lz4 gives ${n} bytes`, ErrorCodes.CHECKSUM);
        } else {
          if (payload.length !== bytes) throw new Error(`codec accepted a raw payload of ${payload.length} bytes for ${bytes}`);
          raw = payload;
        }
        if (native().crc32c(raw) !== msg.crc32c) return bad('CRC-32C mismatch', ErrorCodes.CHECKSUM);
        let at = 0;
        for (const [a, b] of pieces) {
          raw.copy(s.content, a, at, at + b - a);
          at += b - a;
        }
      } else {
        s.content.fill(0, offset, offset + length);
      }
      s.nextOffset = offset + length;
      return { ok: true, answer: { type: 'ack', seq: msg.seq } };
    }
    case 'commit': {
      if (s.current !== msg.generation) return bad(`commit(${msg.generation}) while ${s.current} is open`);
      s.committed = msg.generation;
      s.applying = null;
      s.current = null;
      s.nextOffset = s.durable = s.lastSeq = 0;
      return { ok: true, answer: { type: 'committed', generation: msg.generation } };
    }
    case 'digest-req':
      if (s.current !== null) return bad('digest-req inside a generation');
      return { ok: true, answer: { type: 'digests', offset: msg.offset, length: msg.length, digests: digestsOf(s.content, msg.offset, msg.length) } };
    default:
      return bad(`${msg.type} frame from a primary`);
  }
}

/** The code a frame is refused with by the session layer when it arrives (undecodable, or an error frame), else null. */
function refusedOnArrival(frame: Buffer, size: number): string | null {
  try {
    return decode(frame, { volumeSize: size, chunkSize: CS }).type === 'error' ? ErrorCodes.CONNECTION : null;
  } catch (e) {
    return (e as TmError).code ?? 'undecodable';
  }
}

/** Valid messages of one session from the primary's point of view, before mutation. */
async function plan(rnd: () => number, s: ModelState, size: number): Promise<Obj[]> {
  const int = (n: number) => Math.floor(rnd() * n);
  const out: Obj[] = [];
  const generation = async (gen: number, resumeFrom: number) => {
    out.push({ type: 'begin', generation: gen, resumeFrom });
    let offset = resumeFrom;
    let seq = 1;
    const extents = 1 + int(10);
    for (let i = 0; i < extents && offset < size; i++) {
      offset += int(3) * CS;
      if (offset >= size) break;
      const length = Math.min(size - offset, (1 + int(6)) * CS);
      const k = rnd();
      const bytesOf = (n: number) => {
        const c = rnd();
        return c < 0.5 ? textLike(n, rnd) : c < 0.8 ? Buffer.from(Array.from({ length: n }, () => int(256))) : Buffer.alloc(n, int(3));
      };
      if (k < 0.45) {
        const p = await compressPayload(bytesOf(length));
        out.push({ type: 'extent', seq: seq++, kind: 'data', offset, length, codec: p.codec, crc32c: p.crc32c, payload: Buffer.from(p.payload) });
      } else if (k < 0.6) {
        // Several pieces in one extent (runs): whole chunks with gaps of whole chunks, the last may end the volume.
        const runs: number[] = [];
        let at = 0;
        for (let j = 0, pieces = 2 + int(3); j < pieces && offset + at < size; j++) {
          const len = Math.min(size - offset - at, (1 + int(2)) * CS);
          runs.push(at, len);
          at += len + (1 + int(2)) * CS;
        }
        const bytes = runs.reduce((n, v, j) => (j % 2 ? n + v : n), 0);
        const span = runs[runs.length - 2]! + runs[runs.length - 1]!;
        if (runs.length < 4) {
          const p = await compressPayload(bytesOf(span));
          out.push({ type: 'extent', seq: seq++, kind: 'data', offset, length: span, codec: p.codec, crc32c: p.crc32c, payload: Buffer.from(p.payload) });
        } else {
          const p = await compressPayload(bytesOf(bytes));
          out.push({ type: 'extent', seq: seq++, kind: 'data', offset, length: span, codec: p.codec, crc32c: p.crc32c, runs, payload: Buffer.from(p.payload) });
        }
        offset += span;
        continue;
      } else {
        out.push({ type: 'extent', seq: seq++, kind: k < 0.8 ? 'zero' : 'trim', offset, length });
      }
      offset += length;
    }
    // Now and then the commit names a neighbouring generation (a wrong generation, in a frame that decodes).
    if (rnd() < 0.75) out.push({ type: 'commit', generation: rnd() < 0.05 ? Math.max(1, gen + (rnd() < 0.5 ? -1 : 1)) : gen });
  };
  const a = s.applying;
  if (a && rnd() < 0.6) {
    const r = rnd();
    await generation(a.generation, r < 0.4 ? a.cursor : r < 0.7 ? Math.floor((rnd() * a.cursor) / CS) * CS : 0);
  } else {
    if (rnd() < 0.3) out.push(digestReq(rnd, size));
    // Mostly the next generation; sometimes one further on (allowed), or the committed one again (refused).
    const r = rnd();
    await generation(r < 0.05 && s.committed > 0 ? s.committed - int(Math.min(2, s.committed)) : s.committed + 1 + (r > 0.9 ? int(3) : 0), 0);
  }
  if (rnd() < 0.3) out.push(digestReq(rnd, size));
  if (rnd() < 0.25) await generation(s.committed + 2, 0);
  return out;
}

function digestReq(rnd: () => number, size: number): Obj {
  const chunks = Math.ceil(size / CS);
  const first = Math.floor(rnd() * chunks);
  const offset = first * CS;
  const length = Math.min(size - offset, (1 + Math.floor(rnd() * (chunks - first))) * CS);
  return { type: 'digest-req', offset, length };
}

/** A value that breaks (or, often enough, keeps) the rules of a field. */
function oddValue(rnd: () => number, v: unknown, size: number): unknown {
  const n = typeof v === 'number' ? v : 0;
  const picks: unknown[] = [
    n + 1,
    n - 1,
    n + CS,
    n - CS,
    n ^ (1 << Math.floor(rnd() * 40)),
    0,
    -1,
    size,
    size - (size % CS),
    size + CS,
    2 ** 53,
    2 ** 64,
    1.5,
    NaN,
    '12',
    null,
    true,
    [],
    {},
    Buffer.alloc(3),
    'x'.repeat(300),
    Math.floor(rnd() * (size / CS)) * CS,
  ];
  return picks[Math.floor(rnd() * picks.length)];
}

const FOREIGN: (size: number) => Obj[] = (size) => [
  { type: 'hello', version: 2, node: 'x', mirror: 'vm1', nonce: Buffer.alloc(32) },
  { type: 'ready', committedGeneration: 0, applying: null },
  { type: 'ack', seq: 1, durable: 0 },
  { type: 'committed', generation: 1 },
  { type: 'digests', offset: 0, length: CS, digests: Buffer.alloc(16) },
  { type: 'error', code: 'TM_ERR_CONNECTION', message: 'fuzz' },
  { type: 'nonsense' },
  { type: 'extent', seq: 1, kind: 'trim', offset: size - (size % CS), length: size % CS || CS },
];

/** Mutate a session's messages (fields, then order), encode, mutate bytes. */
function mutate(rnd: () => number, msgs: Obj[], size: number, rate: number): Buffer[] {
  const int = (n: number) => Math.floor(rnd() * n);
  const list = msgs.map((m) => ({ ...m }));
  for (const m of list) {
    if (rnd() >= rate) continue;
    const keys = Object.keys(m);
    const r = rnd();
    if (r < 0.7) {
      const k = keys[int(keys.length)]!;
      if (k === 'payload' && Buffer.isBuffer(m.payload)) {
        const p = Buffer.from(m.payload);
        if (p.length) {
          const i = int(p.length);
          p[i] = p[i]! ^ (1 << int(8));
        }
        m.payload = rnd() < 0.8 ? p : p.subarray(0, int(p.length));
      } else if (k === 'runs' && Array.isArray(m.runs)) {
        const r = [...(m.runs as unknown[])];
        const c = rnd();
        const i = int(r.length);
        if (c < 0.6) r[i] = oddValue(rnd, r[i], size);
        else if (c < 0.8) r.splice(int(r.length), 1);
        else r.push(CS, CS);
        m.runs = rnd() < 0.05 ? oddValue(rnd, m.runs, size) : r;
      } else if (k === 'kind') m.kind = ['data', 'zero', 'trim', 'hole'][int(4)];
      else if (k === 'codec') m.codec = m.codec === 'raw' ? 'lz4' : 'raw';
      else if (k === 'type') m.type = ['begin', 'extent', 'commit', 'digest-req', 'ack'][int(5)];
      else m[k] = oddValue(rnd, m[k], size);
    } else if (r < 0.85) delete m[keys[int(keys.length)]!];
    else Object.defineProperty(m, rnd() < 0.5 ? 'extra' : '__proto__', { value: 1, enumerable: true, writable: true, configurable: true });
  }
  if (list.length > 1 && rnd() < rate * 3) {
    const i = int(list.length - 1);
    const r = rnd();
    if (r < 0.3) [list[i], list[i + 1]] = [list[i + 1]!, list[i]!];
    else if (r < 0.55) list.splice(i, 0, { ...list[i]! });
    else if (r < 0.8) list.splice(i, 1);
    else list.splice(i, 0, FOREIGN(size)[int(FOREIGN(size).length)]!);
  }
  return list.map((m) => {
    let f = packr.pack(m);
    if (rnd() < rate / 2) {
      f = Buffer.from(f);
      const r = rnd();
      if (r < 0.5 && f.length) {
        const i = int(f.length);
        f[i] = f[i]! ^ (1 << int(8));
      }
      else if (r < 0.8) f = f.subarray(0, int(f.length));
      else f = Buffer.concat([f, Buffer.from([int(256)])]);
    }
    return f;
  });
}

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** Run a campaign; never throws for what it finds (see `failures`), only for a broken setup. */
export async function runFuzz(o: FuzzOptions): Promise<FuzzReport> {
  const t0 = performance.now();
  const size = o.size ?? DEFAULT_SIZE;
  const rnd = prng(o.seed);
  const log = o.log ?? (() => {});
  const report: FuzzReport = { seed: o.seed, frames: 0, sessions: 0, endedBy: {}, applied: 0, commits: 0, digestAnswers: 0, restarts: 0, failures: [], seconds: 0 };
  // State files in memory where the machine has a tmpfs: thousands of sessions, each a few fsyncs of state.json.
  const base = existsSync('/dev/shm') ? '/dev/shm' : undefined;
  const pair = await MemoryMirrorPair.create(size, { secondary: { consistency: o.consistency ?? 'off', checkpointBytes: 16 * KiB }, ...(base ? { base } : {}) });
  const quiet = pino({ level: 'silent' });
  let model: ModelState = { content: Buffer.alloc(size), committed: 0, applying: null, current: null, nextOffset: 0, durable: 0, lastSeq: 0 };
  const fail = (why: string) => {
    report.failures.push(`session ${report.sessions} (seed ${o.seed}): ${why}`);
    log(`FAIL ${report.failures[report.failures.length - 1]}`);
  };
  try {
    await pair.startSecondary();
    while (report.frames < o.frames && report.failures.length === 0) {
      report.sessions++;
      if (report.sessions % 25 === 0) {
        await pair.restart('secondary', rnd() < 0.5);
        report.restarts++;
      }
      const sec = pair.secondary!;
      const link = memorySessionPair({ names: ['secondary (fuzz)', 'primary (fuzz)'] });
      void serveSession(link.b, { node: 'site-b', psk: PSK, log: quiet, mirror: (n) => (n === 'vm1' ? sec : undefined) });
      const { ready } = await primaryHandshake(link.a, { node: 'site-a', mirror: 'vm1', psk: PSK, volumeSize: size, chunkSize: CS, volumeId: VOLUME_ID });
      if (ready.committedGeneration !== model.committed || JSON.stringify(ready.applying) !== JSON.stringify(model.applying)) {
        fail(`ready says committed ${ready.committedGeneration}, applying ${JSON.stringify(ready.applying)}; the model: ${model.committed}, ${JSON.stringify(model.applying)}`);
        break;
      }
      // The history exchange that follows every handshake (protocol v3, issue 12): an empty chain, so the secondary never sees a split brain.
      link.a.send({ type: 'history', role: 'primary', ids: [], pending: null, changedBytes: null, divergent: null, unknown: false });
      const hist = await link.a.next(10_000);
      if (hist.type !== 'history' || hist.role !== 'secondary') {
        fail(`expected the secondary's history frame after ready, got ${hist.type}`);
        break;
      }
      const rate = rnd() < 0.3 ? 0 : 0.02 + rnd() * 0.08;
      const frames = mutate(rnd, await plan(rnd, model, size), size, rate);

      // The model's run: states after each valid prefix, answers due, and how the session must end.
      const states: ModelState[] = [cloneState(model)];
      const answers: { after: number; answer: Answer }[] = [];
      let end: { at: number; codes: Set<string>; why: string } | null = null;
      const work = cloneState(model);
      for (let i = 0; i < frames.length; i++) {
        if (end) {
          // Past a frame the receiver refuses, the session may still end sooner: the
          // first later frame the session layer refuses on arrival can decide the code.
          const later = refusedOnArrival(frames[i]!, size);
          if (later) {
            end.codes.add(later);
            break;
          }
          continue;
        }
        const st = modelStep(work, frames[i]!, size);
        if (!st.ok) {
          end = { at: i, codes: new Set([st.code]), why: st.why };
          if (st.onArrival) break;
          continue;
        }
        states.push(cloneState(work));
        if (st.answer) answers.push({ after: states.length - 1, answer: st.answer });
      }

      // The secondary's run: send everything at once, read every answer.
      for (const f of frames) sendRaw(link.a, f);
      report.frames += frames.length;
      let acked = 0; // the shortest prefix the answers prove applied
      let next = 0;
      const reading = (async () => {
        for (;;) {
          let m: Message;
          try {
            m = await link.a.next();
          } catch {
            return;
          }
          // Acks are cumulative: one may cover the acks the model expects before it (never another answer).
          if (m.type === 'ack') {
            const seq = m.seq;
            while (answers[next]?.answer.type === 'ack' && (answers[next]!.answer as { seq: number }).seq < seq) next++;
          }
          const want = answers[next];
          const same =
            want &&
            m.type === want.answer.type &&
            (m.type === 'ack'
              ? want.answer.type === 'ack' && m.seq === want.answer.seq
              : m.type === 'committed'
                ? want.answer.type === 'committed' && m.generation === want.answer.generation
                : m.type === 'digests' && want.answer.type === 'digests' && m.offset === want.answer.offset && m.length === want.answer.length && m.digests.equals(want.answer.digests));
          if (!same) {
            fail(`answer ${next}: got ${JSON.stringify(m, (k, v) => (k === 'digests' ? '<digests>' : v))}, the model expects ${want ? JSON.stringify(want.answer, (k, v) => (k === 'digests' ? '<digests>' : v)) : 'none'}`);
            link.a.destroy();
            return;
          }
          acked = want.after;
          next++;
          if (want.answer.type === 'digests') report.digestAnswers++;
          if (!end && next === answers.length) link.a.close();
        }
      })();
      if (!end && answers.length === 0) link.a.close();
      const timer = setTimeout(() => {
        fail(`the session did not end within 10 s (model: ${end ? `ends at frame ${end.at}, ${end.why}` : 'no violation'}; ${next}/${answers.length} answers)`);
        link.a.destroy();
      }, 10_000);
      const closedWith = await link.a.closed;
      await reading;
      clearTimeout(timer);
      if (report.failures.length) break;
      if (end) {
        const code = closedWith?.code ?? 'none';
        report.endedBy[code] = (report.endedBy[code] ?? 0) + 1;
        if (!end.codes.has(code)) fail(`the session ended with ${code} (${closedWith?.message}); the model allows ${[...end.codes].join(', ')} (frame ${end.at}: ${end.why})`);
      } else if (next !== answers.length) {
        fail(`the session ended (${closedWith?.code}: ${closedWith?.message}) after ${next} of ${answers.length} answers and no frame the model refuses`);
      }
      if (report.failures.length) break;

      // Wait until the secondary is done with the session (its end-of-session checkpoint included).
      for (let i = 0; ; i++) {
        const s = await sec.status();
        if (s.connectedSince === null) break;
        if (i > 2000) {
          fail('the secondary still holds the session 10 s after it ended');
          break;
        }
        await new Promise((r) => setTimeout(r, 5));
      }
      if (report.failures.length) break;
      if (o.sabotage?.session === report.sessions) await o.sabotage.run(pair.target);

      // Which prefix did it apply? At least what it acknowledged; its bytes, committed generation and record must all match one.
      const bytes = await pair.target.read(0, size);
      const rec = JSON.parse(await fsp.readFile(path.join(pair.secondaryState, 'vm1', 'state.json'), 'utf8')) as MirrorState;
      const hash = sha(bytes);
      let found: ModelState | null = null;
      for (let k = states.length - 1; k >= acked; k--) {
        const m = states[k]!;
        if (m.committed === rec.committedGeneration && JSON.stringify(recordAtEnd(m)) === JSON.stringify(rec.applying) && sha(m.content) === hash) {
          found = m;
          report.applied += k;
          break;
        }
      }
      if (!found) {
        const last = states[states.length - 1]!;
        const diff: number[] = [];
        for (let c = 0; c * CS < size && diff.length < 8; c++) if (!bytes.subarray(c * CS, (c + 1) * CS).equals(last.content.subarray(c * CS, (c + 1) * CS))) diff.push(c);
        fail(
          `the replica matches no state the model allows after ${acked}..${states.length - 1} valid frames: committed ${rec.committedGeneration}, applying ${JSON.stringify(rec.applying)}; ` +
            `the longest prefix has committed ${last.committed}, applying ${JSON.stringify(recordAtEnd(last))}, chunks differing from it ${diff.join(',') || 'none'}`,
        );
        break;
      }
      for (let i = 1; i < states.length && states[i - 1] !== found; i++) if (states[i]!.committed !== states[i - 1]!.committed) report.commits++;
      model = { ...cloneState(found), applying: recordAtEnd(found), current: null, nextOffset: 0, durable: 0, lastSeq: 0 };
      if (report.sessions % 50 === 0) log(`${report.sessions} sessions, ${report.frames} frames, committed generation ${model.committed}`);
    }
  } finally {
    await pair.cleanup();
  }
  report.seconds = (performance.now() - t0) / 1000;
  return report;
}

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0) return dflt;
  const v = Number(process.argv[i + 1]);
  if (!Number.isSafeInteger(v) || v < 0) throw new TmError(ErrorCodes.USAGE, `--${name} needs a non-negative integer, got ${process.argv[i + 1]}`);
  return v;
}

async function main(): Promise<void> {
  const frames = arg('frames', 10_000);
  const seed = arg('seed', Date.now() % 2 ** 31);
  const ci = process.argv.indexOf('--consistency');
  const consistency = ci >= 0 ? process.argv[ci + 1] : 'off';
  if (consistency !== 'off' && consistency !== 'journal') throw new TmError(ErrorCodes.USAGE, `--consistency off|journal, got ${consistency}`);
  const verbose = process.argv.includes('--verbose');
  console.log(`fuzz: ${frames} frames at a secondary (consistency ${consistency}), seed ${seed}`);
  const r = await runFuzz({ frames, seed, consistency, log: (l) => (verbose && !l.startsWith('FAIL') ? console.log(l) : undefined) });
  console.log(JSON.stringify({ ...r, failures: r.failures.length }, null, 2));
  for (const f of r.failures) console.log(`FAIL ${f}`);
  console.log(r.failures.length ? `fuzz: ${r.failures.length} failure(s); rerun with --seed ${seed}` : `fuzz: ${r.frames} frames, ${r.sessions} sessions, 0 crashes, 0 wrong bytes (${r.seconds.toFixed(1)} s)`);
  process.exitCode = r.failures.length ? 1 : 0;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((e) => {
    console.error(e);
    process.exit(2);
  });
}
