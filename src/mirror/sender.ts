import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { bitmapRuns, type RoaringBitmap32 } from '../track/bitmap-store.js';
import { Coalesced } from '../util/coalesce.js';
import type { Volume } from '../volume/volume.js';
import { readPieces } from '../volume/pieces.js';
import { segments, type Segment } from '../volume/walk.js';
import { chunkDigests, DIGEST_BYTES, isZeroDigest } from '../volume/digest.js';
import { isAllZero } from '../volume/zero.js';
import { dataBytes, type ExtentMsg } from '../wire/messages.js';
import { compressPayload, crc32c } from '../wire/payload.js';
import type { Session } from '../wire/session.js';
import { CompressionPolicy } from './compression.js';
import { FlowControl } from './flow.js';
import { bitmapBytes } from './generations.js';
import { BufferRing } from '../util/buffer-ring.js';
import type { Progress } from './status.js';

/** Read requests prepared ahead of the socket (operations in flight on the read side). */
const READ_AHEAD = 32;
/** ... and at most this many bytes of them (scattered small pieces: many reads in flight; 1 MiB pieces: 4). */
const READ_AHEAD_BYTES = 4 * 1024 * 1024;
/** Frame bytes besides the payload, counted against a bandwidth cap (an estimate: msgpack keys and ws header) ... */
export const FRAME_OVERHEAD = 96;
/** ... and per piece of a data extent with runs (two msgpack integers). */
const RUN_OVERHEAD = 10;
/** Allocated pieces up to this long are read and sent together with their neighbours (one extent with runs) ... */
const BATCH_PIECE_MAX = 128 * 1024;
/** ... at most this many of them ... */
const BATCH_PIECES = 256;
/** ... and this many bytes in all (or maxExtent when smaller). */
const BATCH_BYTES = 1024 * 1024;

/** An extent ready to send, and the compression window its data counts in (null: none, or not data). */
interface Prepared {
  ext: Omit<ExtentMsg, 'seq'>;
  window: number | null;
  /** Called once the frame has gone to the socket (its lz4 buffer goes back, and the read buffer with the last extent of a read). */
  written?: () => void;
  /** The ring buffer its lz4 payload lies in, if any. */
  room?: Buffer;
}

/** One generation to send: its number, its changed chunks and where the secondary's durable cursor stands. */
export interface GenerationChanges {
  generation: number;
  bitmap: RoaringBitmap32;
  /** Bytes below which the secondary holds the generation durably (0: from the start). */
  resumeFrom: number;
  /**
   * Told what is sent for each chunk (`data` null: `count` chunks from `chunk`
   * travel as zeros or a hole); the scan change source learns its digests here.
   */
  recordSent(chunk: number, data: Buffer | null, count?: number): void;
  /**
   * When present, the sender computes the digest of every chunk it reads
   * (volume/digest.ts: DIGEST_BYTES each, on the threadpool) and hands the
   * digests of each piece's chunks here instead of their data to
   * `recordSent` (holes still go to `recordSent`).
   */
  recordDigests?(chunk: number, digests: Buffer): void;
  /** The generation's identity, sent in its begin (the secondary's history). */
  gid?: { node: string; generation: number; id: string };
  /** The generation also overwrites the chunks the secondary reported as divergent (begin.withPeerChanges). */
  withPeerChanges?: boolean;
  /** When the generation's view was taken (Unix ms), told to the secondary in the begin (its lag). */
  viewAt?: number;
}

export interface SenderOptions {
  chunkSize: number;
  /** Largest piece read and sent as one extent (bytes). */
  maxExtent: number;
  /** Frame bytes sent and not yet acknowledged (flow control). */
  maxInFlight: number;
  signal: AbortSignal;
  /** Bandwidth cap: resolves when `bytes` more may go on the wire. */
  throttle?: (bytes: number, signal: AbortSignal) => Promise<void>;
  /**
   * The secondary reported `durable` bytes of this generation as durable (it
   * made a checkpoint). Runs synchronously; {@link persist} then follows.
   */
  onDurable(durable: number): void;
  /** Make the sending side's checkpoint (tracking state, then the cursor) durable. One at a time, coalesced. */
  persist(): Promise<void>;
  /** Seconds the secondary may stay silent while extents or the commit await its answer (TM_ERR_TIMEOUT after); absent or 0: no limit. */
  peerTimeout?: number;
  /**
   * Whether data pieces are compressed, told what goes out and what the
   * secondary acknowledges (shared by the senders of one role so that it
   * learns across generations); absent: lz4 on every piece.
   */
  compression?: CompressionPolicy;
}

/** Seconds per step of sending one generation ({@link Sender.steps}). */
export interface SendSteps {
  read: number;
  send: number;
  apply: number;
  commit: number;
}

/** Bytes counted over the life of a role (shared by its senders). */
export interface SendCounters {
  /** Data payload bytes before compression. */
  sentBytes: number;
  /** Bytes read from views. */
  readBytes: number;
}


/**
 * Sends one generation over a session and returns once the secondary has
 * committed it: `begin`, the extents of the changed chunks in ascending order,
 * `commit`. The extent pipeline: the changed chunks are cut against the
 * view's allocation map (holes travel as trims and are never read), allocated
 * pieces are read ahead into one ring of buffers, all-zero chunks become zero
 * extents, the rest data extents compressed by the payload codec; flow control
 * bounds the frame bytes not yet acknowledged, and each checkpoint the
 * secondary reports is followed by one of ours. Knows nothing of state files,
 * change sources or sockets.
 */
export class Sender {
  readonly progress: Progress;
  /**
   * Where the sending loop's wall time went, in seconds (they add up to the
   * time of {@link run}, less the begin): `read` waiting for the next extent
   * (reading the view and compressing), `send` encoding and writing frames
   * (and the bandwidth cap), `apply` waiting for the secondary's acks (flow
   * control: it applies what it got), `commit` from the commit frame to the
   * secondary's committed (its last writes, flush and state save).
   */
  readonly steps: SendSteps = { read: 0, send: 0, apply: 0, commit: 0 };
  private readonly cs: number;
  private readonly policy: CompressionPolicy;

  constructor(
    private readonly view: Volume,
    private readonly changes: GenerationChanges,
    private readonly session: Session,
    private readonly o: SenderOptions,
    private readonly counters: SendCounters = { sentBytes: 0, readBytes: 0 },
  ) {
    this.cs = o.chunkSize;
    this.policy = o.compression ?? new CompressionPolicy('lz4');
    const total = this.bytesFrom(0);
    this.progress = { generation: changes.generation, doneBytes: total - this.bytesFrom(Math.ceil(changes.resumeFrom / this.cs)), totalBytes: total };
  }

  private bytesFrom(chunk: number): number {
    return bitmapBytes(this.changes.bitmap, this.cs, this.view.size, chunk);
  }

  async run(): Promise<void> {
    const { generation: gen, resumeFrom } = this.changes;
    const session = this.session;
    const policy = this.policy;
    policy.restart();
    /** Data extents carry their compression window and allocated bytes until acknowledged. */
    const flow = new FlowControl<{ window: number; bytes: number }>(this.o.maxInFlight);
    const checkpoint = new Coalesced(this.o.persist, (e) => flow.fail(asTmError(e, ErrorCodes.STATE, `checkpoint of generation ${gen}`)));
    let durable = resumeFrom;
    /** Extents sent (the last seq), the last seq acknowledged, and whether `commit` went out. */
    let seq = 0;
    let ackedSeq = 0;
    let commitSent = false;
    // Every answer is checked against what was sent: a secondary that acknowledges
    // extents it never got, claims a cursor beyond them or commits early must not
    // make this side drop changes it has not delivered (issue 14 §5).
    const violation = (why: string) => new TmError(ErrorCodes.PROTOCOL, `${session.peerName} ${why} during generation ${gen}`);
    let lastHeard = Date.now();
    const reader = (async () => {
      for (;;) {
        const m = await session.next();
        lastHeard = Date.now();
        if (m.type === 'ack') {
          if (m.seq > seq) throw violation(`acknowledged extent ${m.seq}, but only ${seq} were sent`);
          if (m.seq <= ackedSeq) throw violation(`acknowledged extent ${m.seq} after ${ackedSeq}: acknowledgements must go forward`);
          ackedSeq = m.seq;
          const measured = flow.acked(m.seq);
          if (measured.length > 0) {
            const now = performance.now();
            for (const e of measured) policy.acked(e.window, e.bytes, now);
          }
          this.progress.doneBytes = this.progress.totalBytes - this.bytesFrom(Math.ceil(flow.ackedEnd / this.cs));
          if (m.durable > Math.max(resumeFrom, flow.ackedEnd)) {
            throw violation(`reported ${m.durable} bytes durable, beyond the end of what it acknowledged (${Math.max(resumeFrom, flow.ackedEnd)})`);
          }
          if (m.durable > durable) {
            // The secondary made a checkpoint: make ours too, so that after a crash
            // neither the cursor nor the digests of what it holds are lost.
            durable = m.durable;
            this.o.onDurable(durable);
            checkpoint.request();
          }
        } else if (m.type === 'committed') {
          if (m.generation !== gen) throw violation(`reported generation ${m.generation} committed`);
          if (!commitSent) throw violation(`reported the generation committed before it was sent whole`);
          if (!flow.drained) throw violation(`reported the generation committed with extents unacknowledged`);
          return;
        } else {
          throw violation(`sent an unexpected ${m.type} frame`);
        }
      }
    })();
    reader.catch((e) => flow.fail(asTmError(e, ErrorCodes.CONNECTION)));
    // A secondary that stops answering (or reading) while something awaits its
    // answer ends the session; memory stays bounded meanwhile by flow control.
    const timeoutMs = (this.o.peerTimeout ?? 0) * 1000;
    const watchdog =
      timeoutMs > 0
        ? setInterval(
            () => {
              if ((flow.bytesInFlight > 0 || commitSent) && Date.now() - lastHeard > timeoutMs) {
                const err = new TmError(ErrorCodes.TIMEOUT, `${session.peerName} did not answer for ${timeoutMs / 1000} s during generation ${gen} (${flow.bytesInFlight} bytes unacknowledged${commitSent ? ', commit sent' : ''})`);
                session.fail(err);
                flow.fail(err);
              }
            },
            Math.min(1000, Math.max(10, timeoutMs / 4)),
          )
        : null;
    watchdog?.unref();
    try {
      session.send({
        type: 'begin',
        generation: gen,
        resumeFrom,
        ...(this.changes.gid ? { gid: this.changes.gid } : {}),
        ...(this.changes.withPeerChanges ? { withPeerChanges: true } : {}),
        ...(this.changes.viewAt !== undefined ? { viewAt: this.changes.viewAt } : {}),
      });
      const steps = this.steps;
      let t = performance.now();
      const lap = (k: keyof SendSteps) => {
        const now = performance.now();
        steps[k] += (now - t) / 1000;
        t = now;
      };
      for await (const { ext, window, written } of this.extents(Math.ceil(resumeFrom / this.cs))) {
        lap('read');
        await flow.ready();
        lap('apply');
        if (this.o.signal.aborted) throw new TmError(ErrorCodes.ABORTED, 'stopping');
        const msg = { ...ext, seq: ++seq } as ExtentMsg;
        if (this.o.throttle) await this.o.throttle((msg.payload?.length ?? 0) + FRAME_OVERHEAD + (msg.runs ? (msg.runs.length / 2) * RUN_OVERHEAD : 0), this.o.signal);
        // The secondary's silence is counted from the moment it has something to answer.
        if (flow.bytesInFlight === 0) lastHeard = Date.now();
        const n = session.send(msg, written);
        const bytes = msg.kind === 'data' ? dataBytes(msg) : 0;
        flow.sent(seq, n, msg.offset + msg.length, window !== null ? { window, bytes } : undefined);
        if (msg.kind === 'data') {
          this.counters.sentBytes += bytes;
          policy.sent(bytes, msg.payload!.length);
        }
        lap('send');
      }
      lap('read');
      // Checked by the reader: a `committed` before this point is a lie.
      if (flow.bytesInFlight === 0) lastHeard = Date.now();
      session.send({ type: 'commit', generation: gen });
      commitSent = true;
      try {
        await reader;
      } finally {
        await checkpoint.settled().catch(() => {});
      }
      policy.end();
      await checkpoint.settled();
      lap('commit');
    } finally {
      if (watchdog) clearInterval(watchdog);
    }
  }

  /** The generation's byte ranges from `fromChunk`, as holes and allocated pieces of at most maxExtent bytes. */
  private *pieces(alloc: Awaited<ReturnType<Volume['allocated']>>, fromChunk: number): Generator<Segment> {
    const cs = this.cs;
    const size = this.view.size;
    const ranges = (function* (bitmap: RoaringBitmap32): Generator<[number, number]> {
      for (const [a, b] of bitmapRuns(bitmap, fromChunk)) yield [a * cs, Math.min(b * cs, size)];
    })(this.changes.bitmap);
    yield* segments(ranges, alloc, this.o.maxExtent);
  }

  /**
   * Extents of the generation with up to READ_AHEAD reads (READ_AHEAD_BYTES)
   * done and compressed ahead of the socket. Small allocated pieces that
   * follow each other (no hole between them) are read together, in one
   * request, and sent as one extent with `runs` (up to BATCH_PIECES of them,
   * BATCH_BYTES in all): scattered small changes cost one frame, one read
   * request and one write request per batch instead of per piece. Pieces are
   * read into one ring of buffers: payloads go to the socket without a copy,
   * so a read's buffer goes back when the frame of its last extent has been
   * written (`written`).
   */
  private async *extents(fromChunk: number): AsyncGenerator<Prepared> {
    const alloc = await this.view.allocated(this.cs);
    const batchBytes = Math.min(BATCH_BYTES, this.o.maxExtent);
    // Reads, and the lz4 form of what is compressed, both until their frames are written: what is read
    // ahead, and what flow control lets wait in the socket's queue (the unacknowledged frames).
    const ring = new BufferRing(2 * (READ_AHEAD_BYTES + this.o.maxExtent) + this.o.maxInFlight);
    const ahead: { p: Promise<Prepared[]>; bytes: number; buf: Buffer | null }[] = [];
    let aheadBytes = 0;
    const next = async function* () {
      const a = ahead.shift()!;
      aheadBytes -= a.bytes;
      const prepared = await a.p;
      const buf = a.buf;
      prepared.forEach((p, i) => {
        const room = p.room;
        const last = buf && i === prepared.length - 1 ? buf : undefined;
        if (room || last) {
          p.written = () => {
            if (room) ring.release(room);
            if (last) ring.release(last);
          };
        }
      });
      if (buf && prepared.length === 0) ring.release(buf);
      yield* prepared;
    };
    const push = (p: Promise<Prepared[]>, bytes: number, buf: Buffer | null) => {
      p.catch(() => {}); // awaited below in order; avoid an unhandled rejection meanwhile
      ahead.push({ p, bytes, buf });
      aheadBytes += bytes;
    };
    let batch: Segment[] = [];
    let inBatch = 0;
    const flush = () => {
      if (batch.length === 0) return;
      const buf = ring.take(inBatch);
      push(this.prepare(batch, inBatch, buf, ring), inBatch, buf);
      batch = [];
      inBatch = 0;
    };
    for (const seg of this.pieces(alloc, fromChunk)) {
      if (seg.hole) {
        flush();
        push(Promise.resolve(this.hole(seg)), 0, null);
      } else {
        // A large piece is read alone; a small one joins the batch, read once it is full or something else follows it.
        const alone = seg.length > BATCH_PIECE_MAX || seg.length > batchBytes;
        if (alone || inBatch + seg.length > batchBytes || batch.length >= BATCH_PIECES) flush();
        batch.push(seg);
        inBatch += seg.length;
        if (alone) flush();
      }
      while (ahead.length >= READ_AHEAD || aheadBytes >= READ_AHEAD_BYTES) yield* next();
    }
    flush();
    while (ahead.length) yield* next();
  }

  private hole(seg: Segment): Prepared[] {
    this.changes.recordSent(seg.offset / this.cs, null, Math.ceil(seg.length / this.cs));
    return [{ ext: { type: 'extent', kind: 'trim', offset: seg.offset, length: seg.length }, window: null }];
  }

  /**
   * Read allocated pieces (`total` bytes, ascending) packed into `into`;
   * all-zero chunks become zero extents, the rest data extents (several
   * pieces between zero chunks: one extent with `runs`), lz4-compressed into
   * a buffer of `ring` when the compression policy says so and lz4 saves
   * enough.
   */
  private async prepare(pieces: Segment[], total: number, into: Buffer, ring: BufferRing): Promise<Prepared[]> {
    const cs = this.cs;
    const buf = await readPieces(this.view, pieces, into);
    this.counters.readBytes += total;
    // Pieces are whole chunks but for the volume's last one: the chunks of the packed pieces follow each other in `buf`.
    const digests = this.changes.recordDigests ? await chunkDigests(buf, cs) : null;
    let chunkAt = 0; // the first chunk of `piece` among the digests
    const out: Prepared[] = [];
    // The data run being gathered: where its bytes start in `buf`, and its pieces as [offset, length, ...] (absolute).
    let dataAt = -1;
    let runs: number[] = [];
    const addData = (offset: number, length: number, at: number) => {
      if (dataAt < 0) dataAt = at;
      const n = runs.length;
      if (n > 0 && runs[n - 2]! + runs[n - 1]! === offset) runs[n - 1]! += length;
      else runs.push(offset, length);
    };
    const endData = async () => {
      if (dataAt < 0) return;
      out.push(await this.dataExtent(runs, buf, dataAt, ring));
      dataAt = -1;
      runs = [];
    };
    let at = 0;
    for (const piece of pieces) {
      const chunks = Math.ceil(piece.length / cs);
      // Whether chunk `o` (bytes into the piece) reads as zeros; without digests, the source is told its data.
      const zeroAt = (o: number): boolean => {
        if (digests) return isZeroDigest(digests, chunkAt + o / cs);
        const chunk = buf.subarray(at + o, at + Math.min(o + cs, piece.length));
        const zero = isAllZero(chunk);
        this.changes.recordSent((piece.offset + o) / cs, zero ? null : chunk);
        return zero;
      };
      if (digests) this.changes.recordDigests!(piece.offset / cs, digests.subarray(chunkAt * DIGEST_BYTES, (chunkAt + chunks) * DIGEST_BYTES));
      for (let o = 0; o < piece.length; ) {
        // A run of chunks of one kind inside the piece.
        const zero = zeroAt(o);
        let e = Math.min(o + cs, piece.length);
        while (e < piece.length && zeroAt(e) === zero) e = Math.min(e + cs, piece.length);
        if (zero) {
          await endData();
          out.push({ ext: { type: 'extent', kind: 'zero', offset: piece.offset + o, length: e - o }, window: null });
        } else {
          addData(piece.offset + o, e - o, at + o);
        }
        o = e;
      }
      at += piece.length;
      chunkAt += chunks;
    }
    await endData();
    return out;
  }

  /** A data extent of the pieces `runs` (absolute [offset, length, ...]) whose bytes lie joined in `buf` from `at`. */
  private async dataExtent(runs: number[], buf: Buffer, at: number, ring: BufferRing): Promise<Prepared> {
    const offset = runs[0]!;
    const length = runs[runs.length - 2]! + runs[runs.length - 1]! - offset;
    const rel = runs.length > 2 ? runs.map((v, i) => (i % 2 === 0 ? v - offset : v)) : undefined;
    const bytes = dataBytes({ length, runs: rel });
    const raw = buf.subarray(at, at + bytes);
    const ticket = this.policy.take(bytes);
    let ext: Omit<ExtentMsg, 'seq'>;
    if (ticket.compress) {
      const room = ring.take(bytes);
      const p = await compressPayload(raw, room, this.policy.goodRatio);
      this.policy.compressed(bytes, p.codec === 'lz4' ? p.payload.length : bytes);
      ext = { type: 'extent', kind: 'data', offset, length, codec: p.codec, crc32c: p.crc32c, ...(rel ? { runs: rel } : {}), payload: p.payload };
      if (p.codec === 'lz4') return { ext, window: ticket.window, room };
      ring.release(room);
    } else {
      ext = { type: 'extent', kind: 'data', offset, length, codec: 'raw', crc32c: crc32c(raw), ...(rel ? { runs: rel } : {}), payload: raw };
    }
    return { ext, window: ticket.window };
  }
}
