import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { Coalesced } from '../util/coalesce.js';
import type { Volume } from '../volume/volume.js';
import { writePieces } from '../volume/pieces.js';
import { digestRange } from '../volume/walk.js';
import { dataBytes, runsToPieces, type ExtentMsg, type Message } from '../wire/messages.js';
import { decompressPayload } from '../wire/payload.js';
import type { Session } from '../wire/session.js';
import type { Progress } from './status.js';

/** Where the receiving side stands inside a generation: chunks of it below `cursor` (bytes) are durable. */
export interface Applying {
  generation: number;
  cursor: number;
}

/**
 * What the receiver records durably, and where (the state file, for a
 * Mirror). The receiver calls these in the order that keeps the record true:
 * `applying` is saved before the first write of a generation and, at each
 * checkpoint, only after the target was flushed; `committed` after the last flush.
 */
export interface ReplicaRecord {
  readonly committedGeneration: number;
  readonly applying: Applying | null;
  /**
   * Generation `gen` begins (or resumes at `resumeFrom`): called before any
   * write of it, so that the committed image stays restorable (a base image,
   * an undo journal), and the first time also to record that the target is
   * now between `committedGeneration` and `gen`.
   */
  begin(gen: number, resumeFrom: number, info?: BeginInfo): Promise<void>;
  /** The target is between `committedGeneration` and `a.generation`, durable below `a.cursor`. */
  saveApplying(a: Applying): Promise<void>;
  /** The target holds generation `gen` durably. */
  saveCommitted(gen: number): Promise<void>;
  /**
   * The primary found its volume unchanged from committed generation `gen` in
   * a view taken at `viewAt` (Unix ms, its clock): the replica's image is that
   * recent. Held in memory only (status); optional.
   */
  sawUnchanged?(gen: number, viewAt: number): void;
}

/** What a begin frame says of its generation besides its number (mirror/history.ts). */
export interface BeginInfo {
  gid?: { node: string; generation: number; id: string };
  /** The generation also overwrites the chunks this side reported as divergent. */
  withPeerChanges?: boolean;
  /** Unix ms (the primary's clock) when the view this generation is read from was taken. */
  viewAt?: number;
}

export interface ReceiverOptions {
  chunkSize: number;
  /** A checkpoint at least every this many bytes applied ... */
  checkpointBytes: number;
  /** ... or every this many seconds. */
  checkpointInterval: number;
  /** Names the mirror in error messages. */
  what: string;
  log: { info(o: object, msg: string): void; warn(o: object, msg: string): void };
  /** Extents applied at once (target writes in flight); default {@link MAX_APPLIES}; 1 applies one after the other. */
  maxApplies?: number;
}

/** Extents applied at once by default: writes in flight on the target, so that an undo journal can cover several with one fdatasync ... */
export const MAX_APPLIES = 16;
/** ... and at most this many bytes of them. */
const MAX_APPLY_BYTES = 16 * 1024 * 1024;

/** An extent being applied, in arrival order. */
interface InFlightApply {
  seq: number;
  end: number;
  length: number;
  done: boolean;
  /** Settles when the write ends; never rejects (a failure goes to the run). */
  settled: Promise<void>;
}

/**
 * Applies generations from a session to a target volume: extents arrive in
 * ascending order and up to `maxApplies` of them (MAX_APPLY_BYTES) are
 * written at once; each is acknowledged, in order, once it and every extent
 * before it are written, with the durable cursor. A checkpoint (flush, then
 * the cursor recorded) at least every `checkpointBytes` or
 * `checkpointInterval`, beside the apply loop, covers only the prefix of the
 * generation whose writes have all completed; `commit` waits for every write,
 * flushes and records the generation before `committed` goes back. Knows
 * nothing of files: the target is any Volume, the record is given.
 */
export class Receiver {
  /** Payload bytes written to the target (after decompression). */
  appliedBytes = 0;
  progress: Progress | null = null;
  /** The generation at which the primary asked this side to take over (a switchover agreed), or null. */
  switchoverAt: number | null = null;
  /** Where lz4 payloads are decompressed: one buffer per apply in flight, reused. */
  private readonly scratches: Buffer[] = [];

  constructor(
    private readonly session: Session,
    private readonly target: Volume,
    private readonly record: ReplicaRecord,
    private readonly o: ReceiverOptions,
  ) {}

  /** Apply until the session ends; rejects with why it ended. */
  async run(): Promise<never> {
    const session = this.session;
    const target = this.target;
    const rec = this.record;
    const maxApplies = Math.max(1, this.o.maxApplies ?? MAX_APPLIES);
    let current: number | null = null;
    let nextOffset = 0; // extents of a generation arrive in ascending order
    let lastSeq = 0; // ... and with ascending numbers (a generation's first is 1)
    let applied = 0; // every extent of `current` below this is written
    let durable = 0;
    let sinceCheckpoint = 0;
    let lastCheckpointAt = Date.now();
    const inFlight: InFlightApply[] = [];
    let inFlightBytes = 0;
    let failure: unknown = null;
    let ending = false;
    // One checkpoint at a time: flush, then the cursor it covers is recorded.
    // The cursor is taken when the checkpoint starts: every write below it has
    // completed, so the flush covers them and it never claims more than is durable.
    const checkpoint = new Coalesced(async () => {
      const gen = current!;
      const cursor = applied;
      await target.flush();
      await rec.saveApplying({ generation: gen, cursor });
      durable = cursor;
    });
    const settle = async () => {
      await checkpoint.settled().catch((e) => {
        throw asTmError(e, ErrorCodes.VOLUME_IO, `${this.o.what}: checkpoint of ${target.path}`);
      });
    };

    // The loop waits for the next message or for room among the applies; a
    // failed apply wakes it with the failure.
    let abortNext: ((e: unknown) => void) | null = null;
    let listeners: { resolve: () => void; reject: (e: unknown) => void }[] = [];
    const notify = () => {
      const l = listeners;
      listeners = [];
      for (const x of l) {
        if (failure !== null) x.reject(failure);
        else x.resolve();
      }
    };
    const fail = (e: unknown) => {
      failure ??= e;
      abortNext?.(failure);
      notify();
    };
    const nextMessage = () =>
      new Promise<Message>((resolve, reject) => {
        if (failure !== null) return reject(failure);
        abortNext = reject;
        session.next().then(resolve, reject);
      }).finally(() => (abortNext = null));
    const until = async (cond: () => boolean) => {
      for (;;) {
        if (failure !== null) throw failure;
        if (cond()) return;
        await new Promise<void>((resolve, reject) => listeners.push({ resolve, reject }));
      }
    };
    // Extents whose write completed, in order: the cursor moves, and one ack
    // covers them all (acks are cumulative: docs/protocol.md).
    const retire = () => {
      try {
        let ack = -1;
        while (inFlight.length && inFlight[0]!.done) {
          const e = inFlight.shift()!;
          inFlightBytes -= e.length;
          applied = e.end;
          if (ending) continue;
          sinceCheckpoint += e.length;
          if (this.progress) this.progress.doneBytes = applied;
          if (!checkpoint.busy && (sinceCheckpoint >= this.o.checkpointBytes || Date.now() - lastCheckpointAt >= this.o.checkpointInterval * 1000)) {
            sinceCheckpoint = 0;
            lastCheckpointAt = Date.now();
            checkpoint.request();
          }
          ack = e.seq;
        }
        if (ack >= 0) session.send({ type: 'ack', seq: ack, durable });
      } catch (err) {
        fail(err);
      }
      notify();
    };

    try {
      for (;;) {
        const msg = await nextMessage();
        if (checkpoint.error) await settle();
        switch (msg.type) {
          case 'begin': {
            await settle();
            if (current !== null) throw new TmError(ErrorCodes.PROTOCOL, `begin(${msg.generation}) while generation ${current} is open`);
            if (this.switchoverAt !== null) throw new TmError(ErrorCodes.PROTOCOL, `begin(${msg.generation}) after a switchover at ${this.switchoverAt} was agreed`);
            if (msg.generation <= rec.committedGeneration) {
              throw new TmError(ErrorCodes.PROTOCOL, `begin(${msg.generation}) but generation ${rec.committedGeneration} is already committed`);
            }
            const a = rec.applying;
            if (msg.resumeFrom > 0 && (!a || a.generation !== msg.generation || msg.resumeFrom > a.cursor)) {
              throw new TmError(
                ErrorCodes.PROTOCOL,
                `begin(${msg.generation}) resumes from ${msg.resumeFrom}, but only ${a ? `generation ${a.generation} up to ${a.cursor}` : 'nothing'} is durable here`,
              );
            }
            current = msg.generation;
            lastSeq = 0;
            nextOffset = applied = durable = msg.resumeFrom;
            // From here the target is between committed and `current`.
            await rec.begin(current, msg.resumeFrom, {
              ...(msg.gid ? { gid: msg.gid } : {}),
              ...(msg.withPeerChanges ? { withPeerChanges: true } : {}),
              ...(msg.viewAt !== undefined ? { viewAt: msg.viewAt } : {}),
            });
            this.progress = { generation: current, doneBytes: msg.resumeFrom, totalBytes: target.size };
            lastCheckpointAt = Date.now();
            this.o.log.info({ generation: current, resumeFrom: msg.resumeFrom }, 'generation begins');
            break;
          }
          case 'extent': {
            if (current === null) throw new TmError(ErrorCodes.PROTOCOL, `extent at ${msg.offset} outside a generation`);
            if (msg.offset < nextOffset) {
              throw new TmError(ErrorCodes.PROTOCOL, `extent at ${msg.offset} is below ${nextOffset}: extents must arrive in ascending order`);
            }
            // An ack covers every extent up to its seq: seqs must go up, or one ack would cover an extent not yet written.
            if (msg.seq <= lastSeq) throw new TmError(ErrorCodes.PROTOCOL, `extent ${msg.seq} at ${msg.offset} after extent ${lastSeq}: extent numbers must go up`);
            lastSeq = msg.seq;
            await until(() => inFlight.length < maxApplies && inFlightBytes < MAX_APPLY_BYTES);
            // A data extent with runs counts the bytes it writes, not the range it spans (others: their length).
            const bytes = dataBytes(msg);
            const e: InFlightApply = { seq: msg.seq, end: msg.offset + msg.length, length: bytes, done: false, settled: Promise.resolve() };
            // The frame goes back to the session once written (it may be a view of the socket's reused memory).
            // (In the handlers, not a finally() before them: a failed apply must fail the session before the next frame is handled.)
            e.settled = this.apply(msg).then(
              () => {
                session.release(msg);
                e.done = true;
                retire();
              },
              (err: unknown) => {
                session.release(msg);
                fail(err);
              },
            );
            inFlight.push(e);
            inFlightBytes += bytes;
            nextOffset = e.end;
            break;
          }
          case 'commit': {
            if (current !== msg.generation) throw new TmError(ErrorCodes.PROTOCOL, `commit(${msg.generation}) but generation ${current} is open`);
            await until(() => inFlight.length === 0);
            await settle();
            await target.flush();
            const gen = current;
            await rec.saveCommitted(gen);
            // Closed before telling the primary: if the send fails (session gone), the
            // end-of-session checkpoint below must not record `gen` as applying again.
            current = null;
            this.progress = null;
            this.o.log.info({ generation: gen }, 'generation committed');
            session.send({ type: 'committed', generation: gen });
            break;
          }
          case 'digest-req': {
            if (current !== null) throw new TmError(ErrorCodes.PROTOCOL, `digest-req while generation ${current} is open`);
            session.send({ type: 'digests', offset: msg.offset, length: msg.length, digests: await this.digests(msg.offset, msg.length) });
            break;
          }
          case 'switchover': {
            // A planned switchover: this side must hold exactly the primary's last generation.
            if (current !== null) throw new TmError(ErrorCodes.PROTOCOL, `switchover while generation ${current} is open`);
            if (msg.generation !== rec.committedGeneration || rec.applying !== null) {
              throw new TmError(ErrorCodes.PROTOCOL, `switchover at generation ${msg.generation}, but this side committed ${rec.committedGeneration}`);
            }
            this.switchoverAt = msg.generation;
            this.o.log.info({ generation: msg.generation }, 'switchover agreed: this side is promoted when the primary closes the session');
            session.send({ type: 'switched', generation: msg.generation });
            break;
          }
          case 'unchanged': {
            if (current !== null) throw new TmError(ErrorCodes.PROTOCOL, `unchanged(${msg.generation}) while generation ${current} is open`);
            // Only about the image held here; an older number (a commit raced it) says nothing.
            if (msg.generation === rec.committedGeneration && rec.applying === null) rec.sawUnchanged?.(msg.generation, msg.viewAt);
            break;
          }
          default:
            throw new TmError(ErrorCodes.PROTOCOL, `unexpected ${msg.type} frame during replication`);
        }
      }
    } finally {
      // Writes still in flight end first (no more acks or checkpoints from them):
      // what they wrote counts for the checkpoint below only up to the first that failed.
      ending = true;
      await Promise.all(inFlight.map((e) => e.settled));
      // Let a running checkpoint finish before the next session reads the record.
      await checkpoint.settled().catch(() => {});
      // The session ended (link cut, replaced, refused frame) inside a
      // generation: everything below `applied` was written, so make it durable
      // now and the next session resumes there, not at the last periodic
      // checkpoint. (After a crash, the periodic checkpoints are what is left.)
      if (current !== null && !checkpoint.error && applied > durable) {
        try {
          await target.flush();
          await rec.saveApplying({ generation: current, cursor: applied });
        } catch (e) {
          this.o.log.warn({ err: e }, 'checkpoint at the end of the session failed; the next session resumes from the last one');
        }
      }
    }
  }

  private async digests(offset: number, length: number): Promise<Buffer> {
    try {
      return await digestRange(this.target, offset, length, this.o.chunkSize);
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `${this.o.what}: digests of ${this.target.path} at ${offset}+${length}`);
    }
  }

  /** A decompression buffer of at least `n` bytes, from those no apply is using. */
  private takeScratch(n: number): Buffer {
    const i = this.scratches.findIndex((b) => b.length >= n);
    if (i >= 0) return this.scratches.splice(i, 1)[0]!;
    this.scratches.pop(); // too small for this size: let it go, so the pool stays one buffer per apply in flight
    return Buffer.allocUnsafe(n);
  }

  private async apply(msg: ExtentMsg): Promise<void> {
    let scratch: Buffer | undefined;
    try {
      if (msg.kind === 'data') {
        if (msg.codec === 'lz4') scratch = this.takeScratch(dataBytes(msg));
        // Throws TM_ERR_CHECKSUM before anything is written.
        const raw = decompressPayload(msg, scratch);
        if (msg.runs) await writePieces(this.target, runsToPieces(msg.offset, msg.runs), raw);
        else await this.target.write(msg.offset, raw);
        this.appliedBytes += raw.length;
      } else {
        await this.target.zero(msg.offset, msg.length);
      }
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `${this.o.what}, target ${this.target.path} at ${msg.offset}+${msg.length}`);
    } finally {
      if (scratch) this.scratches.push(scratch);
    }
  }
}
