import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { Coalesced } from '../util/coalesce.js';
import type { Volume } from '../volume/volume.js';
import { digestRange } from '../volume/walk.js';
import type { ExtentMsg } from '../wire/messages.js';
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
}

/** What a begin frame says of its generation besides its number (mirror/history.ts). */
export interface BeginInfo {
  gid?: { node: string; generation: number; id: string };
  /** The generation also overwrites the chunks this side reported as divergent. */
  withPeerChanges?: boolean;
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
}

/**
 * Applies generations from a session to a target volume: extents in
 * ascending order, each acknowledged after its write, with the durable
 * cursor; a checkpoint (flush, then the cursor recorded) at least every
 * `checkpointBytes` or `checkpointInterval`, beside the apply loop; `commit`
 * flushes and records the generation before `committed` goes back. Knows
 * nothing of files: the target is any Volume, the record is given.
 */
export class Receiver {
  /** Payload bytes written to the target (after decompression). */
  appliedBytes = 0;
  progress: Progress | null = null;
  /** The generation at which the primary asked this side to take over (a switchover agreed), or null. */
  switchoverAt: number | null = null;
  /** Where lz4 payloads are decompressed, reused extent after extent (each write is awaited before the next extent). */
  private scratch: Buffer | null = null;

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
    let current: number | null = null;
    let nextOffset = 0; // extents of a generation arrive in ascending order
    let durable = 0;
    let sinceCheckpoint = 0;
    let lastCheckpointAt = Date.now();
    // One checkpoint at a time: flush, then the cursor it covers is recorded.
    // The cursor is taken when the checkpoint starts: every write below it has
    // completed (each is awaited), so it never claims more than is durable.
    const checkpoint = new Coalesced(async () => {
      const gen = current!;
      const cursor = nextOffset;
      await target.flush();
      await rec.saveApplying({ generation: gen, cursor });
      durable = cursor;
    });
    const settle = async () => {
      await checkpoint.settled().catch((e) => {
        throw asTmError(e, ErrorCodes.VOLUME_IO, `${this.o.what}: checkpoint of ${target.path}`);
      });
    };
    try {
      for (;;) {
        const msg = await session.next();
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
            nextOffset = durable = msg.resumeFrom;
            // From here the target is between committed and `current`.
            await rec.begin(current, msg.resumeFrom, { ...(msg.gid ? { gid: msg.gid } : {}), ...(msg.withPeerChanges ? { withPeerChanges: true } : {}) });
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
            await this.apply(msg);
            nextOffset = msg.offset + msg.length;
            sinceCheckpoint += msg.length;
            if (this.progress) this.progress.doneBytes = nextOffset;
            if (!checkpoint.busy && (sinceCheckpoint >= this.o.checkpointBytes || Date.now() - lastCheckpointAt >= this.o.checkpointInterval * 1000)) {
              sinceCheckpoint = 0;
              lastCheckpointAt = Date.now();
              checkpoint.request();
            }
            session.send({ type: 'ack', seq: msg.seq, durable });
            break;
          }
          case 'commit': {
            if (current !== msg.generation) throw new TmError(ErrorCodes.PROTOCOL, `commit(${msg.generation}) but generation ${current} is open`);
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
          default:
            throw new TmError(ErrorCodes.PROTOCOL, `unexpected ${msg.type} frame during replication`);
        }
      }
    } finally {
      // Let a running checkpoint finish before the next session reads the record.
      await checkpoint.settled().catch(() => {});
      // The session ended (link cut, replaced, refused frame) inside a
      // generation: everything below nextOffset was written, so make it durable
      // now and the next session resumes there, not at the last periodic
      // checkpoint. (After a crash, the periodic checkpoints are what is left.)
      if (current !== null && !checkpoint.error && nextOffset > durable) {
        try {
          await target.flush();
          await rec.saveApplying({ generation: current, cursor: nextOffset });
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

  private async apply(msg: ExtentMsg): Promise<void> {
    try {
      if (msg.kind === 'data') {
        if (msg.codec === 'lz4' && (!this.scratch || this.scratch.length < msg.length)) this.scratch = Buffer.allocUnsafe(msg.length);
        // Throws TM_ERR_CHECKSUM before anything is written.
        const raw = decompressPayload(msg, this.scratch ?? undefined);
        await this.target.write(msg.offset, raw);
        this.appliedBytes += raw.length;
      } else {
        await this.target.zero(msg.offset, msg.length);
      }
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `${this.o.what}, target ${this.target.path} at ${msg.offset}+${msg.length}`);
    }
  }
}
