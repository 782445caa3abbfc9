import * as path from 'node:path';
import type { Logger } from 'pino';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import type { MirrorConfig } from '../daemon/config.js';
import { decompressPayload } from '../wire/codec.js';
import { refuse } from '../wire/handshake.js';
import { DIGEST_BYTES, type AuthMsg, type ExtentMsg, type HelloMsg } from '../wire/messages.js';
import { chunkDigest } from '../track/scan.js';
import type { Session } from '../wire/session.js';
import { SparseFileVolume } from '../volume/sparse-file.js';
import { totalBytes } from '../volume/volume.js';
import { StateFile, STATE_FORMAT, type SecondaryState } from './state.js';
import type { MirrorStatus, SecondaryPhase } from './status.js';

/** Bytes read per request when computing digests of the target (a multiple of every chunk size). */
const DIGEST_READ_BYTES = 4 * 1024 * 1024;

/**
 * The receiving side of one mirror. Takes sessions the daemon has
 * authenticated, checks the volume identity, then applies generations:
 * extents in ascending order, acknowledged one by one; the durable cursor is
 * persisted (after fdatasync) at least every `checkpointBytes` or
 * `checkpointInterval`; `commit` flushes and persists before `committed` goes
 * back. The target path comes from this host's config, never from the wire.
 */
export class SecondaryMirror {
  private readonly stateFile: StateFile<SecondaryState>;
  private state: SecondaryState | undefined;
  private phase: SecondaryPhase = 'waiting';
  private lastError: TmError | null = null;
  private session: Session | null = null;
  private sessionDone: Promise<void> = Promise.resolve();
  private accepting: Promise<void> = Promise.resolve();
  private appliedBytes = 0;
  private wireBytesBase = 0;
  private allocatedCache: { at: number; bytes: number } = { at: 0, bytes: 0 };
  private progress: MirrorStatus['progress'] = null;
  private stopped = false;
  private sessions = 0;
  private connectedSince: Date | null = null;

  constructor(
    readonly config: MirrorConfig,
    stateDir: string,
    private readonly log: Logger,
  ) {
    this.stateFile = new StateFile(path.join(stateDir, config.name));
  }

  get name(): string {
    return this.config.name;
  }

  async start(): Promise<void> {
    await this.stateFile.init();
    this.state = await this.stateFile.load('secondary');
    this.log.info({ committedGeneration: this.state?.committedGeneration ?? 0, applying: this.state?.applying ?? null }, 'secondary mirror ready');
  }

  /**
   * Take an authenticated session for this mirror. A session already running
   * is replaced: its peer may be gone without the socket having noticed.
   */
  accept(session: Session, hello: HelloMsg, auth: AuthMsg): Promise<void> {
    // One accept at a time: two sessions racing through the checks must not
    // both end up applying to the target.
    const run = this.accepting.then(() => this.acceptNow(session, hello, auth));
    this.accepting = run.catch(() => {});
    return run;
  }

  private async acceptNow(session: Session, hello: HelloMsg, auth: AuthMsg): Promise<void> {
    if (this.stopped) {
      throw refuse(session, new TmError(ErrorCodes.CONNECTION, `mirror ${this.name} on this node is shutting down`));
    }
    if (this.session) {
      this.log.warn({ peer: hello.node }, 'new session replaces the running one');
      this.session.destroy(new TmError(ErrorCodes.CONNECTION, 'replaced by a new session'));
      await this.sessionDone;
    }
    let volume: SparseFileVolume | undefined;
    try {
      if (auth.chunkSize !== this.config.chunkSize) {
        throw refuse(
          session,
          new TmError(
            ErrorCodes.CHUNK_SIZE_MISMATCH,
            `mirror ${this.name}: the primary uses chunks of ${auth.chunkSize} bytes, this node's config says ${this.config.chunkSize} (chunkSize must match on both sides)`,
          ),
        );
      }
      volume = await this.openTarget(session, auth);
      this.session = session;
      const ready = await this.admit(session, hello, auth);
      session.ctx.volumeSize = auth.volumeSize;
      session.ctx.chunkSize = auth.chunkSize;
      session.send(ready);
    } catch (e) {
      await volume?.close();
      const err = asTmError(e, ErrorCodes.INTERNAL, `mirror ${this.name}`);
      if (session.isOpen) refuse(session, err);
      this.setError(err);
      if (this.session === session) this.session = null;
      throw err;
    }
    this.phase = 'idle';
    this.lastError = null;
    this.sessions++;
    this.connectedSince = new Date();
    this.log.info({ peer: hello.node, committedGeneration: this.state!.committedGeneration, applying: this.state!.applying, sessions: this.sessions }, 'session accepted');
    const v = volume;
    this.sessionDone = this.applyLoop(session, v)
      .catch((e) => {
        const err = asTmError(e, ErrorCodes.INTERNAL, `mirror ${this.name}`);
        if (session.isOpen) session.fail(err);
        if (err.code === ErrorCodes.CONNECTION || err.code === ErrorCodes.ABORTED) {
          this.log.info({ code: err.code }, err.message);
          this.phase = 'waiting';
        } else {
          this.setError(err);
        }
      })
      .finally(async () => {
        this.wireBytesBase += session.counters.bytesIn;
        if (this.session === session) {
          this.session = null;
          this.connectedSince = null;
        }
        this.progress = null;
        await v.close().catch(() => {});
      });
  }

  private async openTarget(session: Session, auth: AuthMsg): Promise<SparseFileVolume> {
    const target = this.config.volume;
    let volume: SparseFileVolume;
    try {
      volume = await SparseFileVolume.open(target, { create: { size: auth.volumeSize } });
    } catch (e) {
      throw refuse(session, asTmError(e, ErrorCodes.VOLUME_IO, `target ${target}`));
    }
    if (volume.size !== auth.volumeSize) {
      await volume.close();
      throw refuse(
        session,
        new TmError(ErrorCodes.SIZE_MISMATCH, `mirror ${this.name}: the source volume has ${auth.volumeSize} bytes but the target ${target} has ${volume.size}; nothing was written`),
      );
    }
    return volume;
  }

  /** Check identity against persisted state; returns the ready frame. */
  private async admit(session: Session, hello: HelloMsg, auth: AuthMsg) {
    let s = this.state;
    if (s && s.volumeId === auth.volumeId && s.chunkSize !== auth.chunkSize) {
      throw refuse(
        session,
        new TmError(ErrorCodes.CHUNK_SIZE_MISMATCH, `mirror ${this.name}: the primary uses chunks of ${auth.chunkSize} bytes, the replica was built with ${s.chunkSize}`),
      );
    }
    if (s && s.volumeId !== auth.volumeId) {
      if (!auth.fresh) {
        throw refuse(
          session,
          new TmError(
            ErrorCodes.IDENTITY_MISMATCH,
            `mirror ${this.name}: the primary's volume id ${auth.volumeId} is not ${s.volumeId}, the volume this replica holds; nothing was written (remove ${this.stateFile.file} to replace the replica)`,
          ),
        );
      }
      // The primary lost its tracking state (or is new) and says so: keep the
      // replica and its generation numbers; the primary compares digests with it.
      this.log.warn({ was: s.volumeId, now: auth.volumeId, committedGeneration: s.committedGeneration }, 'the primary has no tracking state: adopting its volume id; it will compare digests with this replica');
      s.volumeId = auth.volumeId;
      s.primaryNode = hello.node;
      await this.stateFile.save(s);
    }
    if (!s) {
      s = {
        format: STATE_FORMAT,
        role: 'secondary',
        volumeId: auth.volumeId,
        volumeSize: auth.volumeSize,
        chunkSize: auth.chunkSize,
        primaryNode: hello.node,
        committedGeneration: 0,
        applying: null,
        committedAt: null,
      };
      await this.stateFile.save(s);
    }
    this.state = s;
    return { type: 'ready' as const, committedGeneration: s.committedGeneration, applying: s.applying };
  }

  private async applyLoop(session: Session, volume: SparseFileVolume): Promise<void> {
    const s = this.state!;
    let current: number | null = null;
    let nextOffset = 0; // extents of a generation arrive in ascending order
    let durable = 0;
    let sinceCheckpoint = 0;
    let lastCheckpointAt = Date.now();
    // One checkpoint at a time runs beside the apply loop: fdatasync, then the
    // cursor it covers goes to state.json. Writes below the cursor completed
    // before the fdatasync began, so the cursor never claims more than is durable.
    let flushing: Promise<void> | null = null;
    let flushError: unknown = null;
    const startCheckpoint = () => {
      const gen = current!;
      const cursor = nextOffset;
      sinceCheckpoint = 0;
      lastCheckpointAt = Date.now();
      flushing = (async () => {
        await volume.flush();
        s.applying = { generation: gen, cursor };
        await this.stateFile.save(s);
        durable = cursor;
      })()
        .catch((e) => {
          flushError = e;
        })
        .finally(() => {
          flushing = null;
        });
    };
    const settle = async () => {
      if (flushing) await flushing;
      if (flushError) throw asTmError(flushError, ErrorCodes.VOLUME_IO, `mirror ${this.name}: checkpoint of ${this.config.volume}`);
    };
    try {
      for (;;) {
        const msg = await session.next();
        if (flushError) await settle();
        switch (msg.type) {
          case 'begin': {
            await settle();
            if (current !== null) throw new TmError(ErrorCodes.PROTOCOL, `begin(${msg.generation}) while generation ${current} is open`);
            if (msg.generation <= s.committedGeneration) {
              throw new TmError(ErrorCodes.PROTOCOL, `begin(${msg.generation}) but generation ${s.committedGeneration} is already committed`);
            }
            if (msg.resumeFrom > 0) {
              const a = s.applying;
              if (!a || a.generation !== msg.generation || msg.resumeFrom > a.cursor) {
                throw new TmError(
                  ErrorCodes.PROTOCOL,
                  `begin(${msg.generation}) resumes from ${msg.resumeFrom}, but only ${a ? `generation ${a.generation} up to ${a.cursor}` : 'nothing'} is durable here`,
                );
              }
            }
            current = msg.generation;
            nextOffset = msg.resumeFrom;
            durable = msg.resumeFrom;
            if (!s.applying || s.applying.generation !== current) {
              // From here the target is between committed and `current`.
              s.applying = { generation: current, cursor: msg.resumeFrom };
              await this.stateFile.save(s);
            }
            this.phase = 'receiving';
            this.progress = { generation: current, doneBytes: msg.resumeFrom, totalBytes: s.volumeSize };
            lastCheckpointAt = Date.now();
            this.log.info({ generation: current, resumeFrom: msg.resumeFrom }, 'generation begins');
            break;
          }
          case 'extent': {
            if (current === null) throw new TmError(ErrorCodes.PROTOCOL, `extent at ${msg.offset} outside a generation`);
            if (msg.offset < nextOffset) {
              throw new TmError(ErrorCodes.PROTOCOL, `extent at ${msg.offset} is below ${nextOffset}: extents must arrive in ascending order`);
            }
            await this.applyExtent(volume, msg);
            nextOffset = msg.offset + msg.length;
            sinceCheckpoint += msg.length;
            if (this.progress) this.progress.doneBytes = nextOffset;
            if (!flushing && (sinceCheckpoint >= this.config.checkpointBytes || Date.now() - lastCheckpointAt >= this.config.checkpointInterval * 1000)) {
              startCheckpoint();
            }
            session.send({ type: 'ack', seq: msg.seq, durable });
            break;
          }
          case 'commit': {
            if (current !== msg.generation) throw new TmError(ErrorCodes.PROTOCOL, `commit(${msg.generation}) but generation ${current} is open`);
            await settle();
            await volume.flush();
            s.committedGeneration = current;
            s.applying = null;
            s.committedAt = Date.now();
            await this.stateFile.save(s);
            this.log.info({ generation: current }, 'generation committed');
            session.send({ type: 'committed', generation: current });
            current = null;
            this.phase = 'idle';
            this.progress = null;
            this.allocatedCache.at = 0;
            break;
          }
          case 'digest-req': {
            if (current !== null) throw new TmError(ErrorCodes.PROTOCOL, `digest-req while generation ${current} is open`);
            session.send({ type: 'digests', offset: msg.offset, length: msg.length, digests: await this.digests(volume, msg.offset, msg.length) });
            break;
          }
          default:
            throw new TmError(ErrorCodes.PROTOCOL, `unexpected ${msg.type} frame during replication`);
        }
      }
    } finally {
      // Let a running checkpoint finish before the next session reads the state.
      if (flushing) await flushing;
      // The session ended (link cut, replaced, refused frame) inside a
      // generation: everything below nextOffset was written, so make it durable
      // now and the next session resumes there, not at the last periodic
      // checkpoint. (After a crash, the periodic checkpoints are what is left.)
      if (current !== null && !flushError && nextOffset > durable) {
        try {
          await volume.flush();
          s.applying = { generation: current, cursor: nextOffset };
          await this.stateFile.save(s);
        } catch (e) {
          this.log.warn({ err: e }, 'checkpoint at the end of the session failed; the next session resumes from the last one');
        }
      }
    }
  }

  /** Digests of the target's chunks in a range: holes and zeros as the zero digest, never read. */
  private async digests(volume: SparseFileVolume, offset: number, length: number): Promise<Buffer> {
    const cs = this.state!.chunkSize;
    const out = Buffer.alloc(Math.ceil(length / cs) * DIGEST_BYTES, 0);
    const end = offset + length;
    try {
      for (const r of await volume.allocated(cs)) {
        const from = Math.max(r.offset, offset);
        const to = Math.min(r.offset + r.length, end);
        for (let pos = from; pos < to; pos += DIGEST_READ_BYTES) {
          const n = Math.min(DIGEST_READ_BYTES, to - pos);
          const buf = await volume.read(pos, n);
          for (let at = 0; at < n; at += cs) chunkDigest(buf.subarray(at, Math.min(at + cs, n)), out, ((pos + at - offset) / cs) * DIGEST_BYTES);
        }
      }
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `mirror ${this.name}: digests of ${this.config.volume} at ${offset}+${length}`);
    }
    return out;
  }

  /**
   * Where lz4 payloads are decompressed, reused extent after extent: the apply
   * loop awaits each write before it decompresses the next extent. Grows to
   * the largest extent seen (at most MAX_EXTENT_BYTES).
   */
  private scratch: Buffer | null = null;

  private async applyExtent(volume: SparseFileVolume, msg: ExtentMsg): Promise<void> {
    try {
      if (msg.kind === 'data') {
        if (msg.codec === 'lz4' && (!this.scratch || this.scratch.length < msg.length)) this.scratch = Buffer.allocUnsafe(msg.length);
        // Throws TM_ERR_CHECKSUM before anything is written.
        const raw = decompressPayload(msg, this.scratch ?? undefined);
        await volume.write(msg.offset, raw);
        this.appliedBytes += raw.length;
      } else {
        await volume.zero(msg.offset, msg.length);
      }
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `mirror ${this.name}, target ${this.config.volume} at ${msg.offset}+${msg.length}`);
    }
  }

  private setError(err: TmError): void {
    this.lastError = err;
    this.phase = 'error';
    this.log.error({ code: err.code }, err.message);
  }

  async status(): Promise<MirrorStatus> {
    const s = this.state;
    if (s && Date.now() - this.allocatedCache.at > 2000) {
      try {
        const v = await SparseFileVolume.open(this.config.volume, { readOnly: true });
        try {
          this.allocatedCache = { at: Date.now(), bytes: totalBytes(await v.allocated()) };
        } finally {
          await v.close();
        }
      } catch {
        // the target may not exist yet
      }
    }
    return {
      name: this.name,
      role: 'secondary',
      state: this.phase,
      volume: this.config.volume,
      peer: s?.primaryNode ?? null,
      trackingMode: null,
      chunkSize: s?.chunkSize ?? this.config.chunkSize,
      volumeBytes: s?.volumeSize ?? 0,
      allocatedBytes: this.allocatedCache.bytes,
      sentBytes: this.appliedBytes,
      wireBytes: this.wireBytesBase + (this.session?.counters.bytesIn ?? 0),
      dirtyBytes: 0,
      generation: s?.applying?.generation ?? s?.committedGeneration ?? 0,
      committedGeneration: s?.committedGeneration ?? 0,
      lagSeconds: null,
      progress: this.progress ? { ...this.progress } : null,
      lastCycle: null,
      error: this.lastError ? this.lastError.toJSON() : null,
      sessions: this.sessions,
      connectedSince: this.session && this.connectedSince ? this.connectedSince.toISOString() : null,
    };
  }

  /** Stop: end the session (the primary resends from the durable cursor). Idempotent. */
  async stop(): Promise<void> {
    this.stopped = true;
    // A session being accepted right now is let through its checks first, so
    // that it is closed below rather than left applying after the stop.
    await this.accepting;
    this.session?.close();
    await this.sessionDone;
    this.phase = 'stopped';
  }
}
