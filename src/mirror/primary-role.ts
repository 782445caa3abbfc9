import { randomBytes } from 'node:crypto';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { BitmapStore, type RoaringBitmap32 } from '../track/bitmap-store.js';
import { createSource } from '../track/index.js';
import type { ChangeSource } from '../track/source.js';
import { sleep } from '../util/sleep.js';
import { totalBytes, type Volume } from '../volume/volume.js';
import { primaryHandshake } from '../wire/handshake.js';
import type { Session } from '../wire/session.js';
import type { RoleContext } from './context.js';
import * as gens from './generations.js';
import { reconcileByDigests } from './reconcile.js';
import { Sender, type SendCounters } from './sender.js';
import { DEFAULT_PEER_TIMEOUT } from './settings.js';
import { newState, type MirrorState } from './state.js';
import type { CycleReport, MirrorStatus, PrimaryPhase, Progress, ReconcileReport } from './status.js';

/** Codes after which retrying soon cannot help: back off to the maximum at once. */
const REFUSALS = new Set<string>([
  ErrorCodes.AUTH_FAILED,
  ErrorCodes.VERSION_MISMATCH,
  ErrorCodes.UNKNOWN_MIRROR,
  ErrorCodes.SIZE_MISMATCH,
  ErrorCodes.CHUNK_SIZE_MISMATCH,
  ErrorCodes.IDENTITY_MISMATCH,
  ErrorCodes.TLS,
]);

/**
 * What a Mirror runs while its role is primary: keeps the secondary current
 * by generations. Connects (with backoff), authenticates, then loops: send
 * the pending generation (a {@link Sender}), reconcile by digests when
 * tracking state was lost, or detect the next generation with the change
 * source. Generation 1 is every chunk of the volume (the initial sync). A
 * generation's bitmap is on disk before any of its data is sent and is
 * removed only after the secondary's `committed`; after any interruption the
 * generation is resent from the secondary's durable cursor.
 */
export class PrimaryRole {
  readonly role = 'primary' as const;
  private readonly bitmaps: BitmapStore;
  private volume: Volume | null = null;
  private source: ChangeSource | null = null;
  private phase: PrimaryPhase = 'connecting';
  private lastError: TmError | null = null;
  private session: Session | null = null;
  private readonly abort = new AbortController();
  private loopDone: Promise<void> = Promise.resolve();
  private readonly counters: SendCounters = { sentBytes: 0, readBytes: 0 };
  private wireBytesBase = 0;
  private allocatedBytes = 0;
  private sender: Sender | null = null;
  private lastCycle: CycleReport | null = null;
  /** The generation being sent: when its detection started, and the counters then. */
  private cycle: { generation: number; started: number; readBefore: number; detectReadBytes: number; changedBytes: number; wireAtStart: number } | null = null;
  private lastDetectAt = 0;
  private reconcileReport: ReconcileReport | null = null;
  private sessions = 0;
  private connectedSince: Date | null = null;

  constructor(private readonly r: RoleContext) {
    this.bitmaps = new BitmapStore(r.store.dir);
  }

  private get state(): MirrorState {
    return this.r.store.state!;
  }

  private get signal(): AbortSignal {
    return this.abort.signal;
  }

  /** Open the volume, the state and the change source, then replicate in the background until {@link stop}. */
  async start(): Promise<void> {
    const c = this.r.config;
    const volume = await this.r.openVolume(c.volume, { readOnly: true });
    this.volume = volume;
    try {
      let s = this.r.store.state;
      if (s && s.chunkSize !== c.chunkSize) {
        throw new TmError(ErrorCodes.CHUNK_SIZE_MISMATCH, `mirror ${c.name}: state ${this.r.store.file} was built with chunks of ${s.chunkSize} bytes but the config says ${c.chunkSize}`);
      }
      if (s && s.volumeSize !== volume.size) {
        throw new TmError(ErrorCodes.SIZE_MISMATCH, `mirror ${c.name}: volume ${c.volume} has ${volume.size} bytes, the mirror was built for ${s.volumeSize}; resizing is not supported yet`);
      }
      if (!s) {
        s = newState('primary', { volumeId: randomBytes(16).toString('hex'), volumeSize: volume.size, chunkSize: c.chunkSize });
        await this.r.store.set(s);
      }
      const picked = await createSource(c, volume, this.r.store.dir);
      this.source = picked.source;
      if (picked.reason) this.r.log.info({ trackingMode: picked.source.mode }, `tracking.mode auto: ${picked.reason}`);
      await this.source.open(s.generation, s.committedGeneration);
      this.allocatedBytes = totalBytes(await volume.allocated());
      this.r.log.info({ generation: s.generation, committedGeneration: s.committedGeneration, pending: s.pending, volumeBytes: s.volumeSize, allocatedBytes: this.allocatedBytes }, 'primary mirror ready');
    } catch (e) {
      await volume.close();
      this.volume = null;
      throw e;
    }
    this.loopDone = this.run();
  }

  /** Stop replicating (`abort`: drop the session at once instead of closing it); tracking state is persisted. Idempotent. */
  async stop(abort = false): Promise<void> {
    this.abort.abort();
    if (abort) this.session?.destroy();
    else this.session?.close();
    await this.loopDone;
    await this.source?.close().catch((e) => this.r.log.warn({ err: e }, 'persisting tracking state failed'));
    await this.volume?.close();
    this.source = null;
    this.volume = null;
    this.phase = 'stopped';
  }

  private async run(): Promise<void> {
    const c = this.r.config;
    let backoff = c.reconnectMin;
    while (!this.signal.aborted) {
      if (this.phase !== 'error') this.phase = 'connecting';
      let session: Session | null = null;
      try {
        session = await this.r.ctx.connect!(this.signal);
        this.session = session;
        this.signal.throwIfAborted();
        const s = this.state;
        const { peerNode, ready } = await primaryHandshake(session, {
          node: this.r.ctx.nodeName,
          mirror: c.name,
          psk: this.r.ctx.psk,
          volumeSize: s.volumeSize,
          chunkSize: s.chunkSize,
          volumeId: s.volumeId,
          fresh: gens.isFresh(s),
        });
        backoff = c.reconnectMin;
        this.lastError = null;
        this.sessions++;
        this.connectedSince = new Date();
        this.r.log.info({ peer: peerNode, committedGeneration: ready.committedGeneration, applying: ready.applying, sessions: this.sessions }, 'session established');
        if (s.peerNode !== peerNode) {
          s.peerNode = peerNode;
          await this.r.store.save();
        }
        await this.replicate(session, ready.committedGeneration, ready.applying);
      } catch (e) {
        const err = asTmError(e, ErrorCodes.INTERNAL, `mirror ${c.name}`);
        if (this.signal.aborted) {
          // Stopping: a session that opened meanwhile goes too, and nothing more is written.
          session?.close();
          break;
        }
        session?.fail(err);
        this.lastError = err;
        this.phase = 'error';
        const refused = REFUSALS.has(err.code);
        this.r.log.error({ code: err.code, retryInSeconds: refused ? c.reconnectMax : backoff }, err.message);
        if (refused) backoff = c.reconnectMax;
        await sleep(backoff * 1000, this.signal);
        backoff = Math.min(backoff * 2, c.reconnectMax);
      } finally {
        if (session) this.wireBytesBase += session.counters.bytesOut;
        this.session = null;
        this.connectedSince = null;
        this.sender = null;
      }
    }
  }

  /** Send pending and new generations over an established session until it ends. */
  private async replicate(session: Session, peerCommitted: number, applying: { generation: number; cursor: number } | null): Promise<void> {
    const s = this.state;
    const done = gens.committedMeanwhile(s, peerCommitted);
    if (done !== null) await this.markCommitted(done);
    if (gens.reconcileAfterHandshake(s, peerCommitted, applying)) await this.r.store.save();
    let resume = gens.resumeCursor(s, applying);
    while (!this.signal.aborted) {
      const step = gens.nextStep(s);
      switch (step.kind) {
        case 'send':
          await this.sendGeneration(session, step.generation, resume);
          resume = 0;
          break;
        case 'reconcile':
          await this.reconcile(session, step.reason);
          break;
        case 'initial-sync':
          await this.detect(true);
          break;
        case 'wait': {
          this.phase = 'in-sync';
          const wait = Math.max(0, this.lastDetectAt + this.r.config.tracking.interval * 1000 - Date.now());
          await sleep(wait, this.signal, session.closed);
          if (this.signal.aborted) return;
          if (!session.isOpen) throw (await session.closed) ?? new TmError(ErrorCodes.CONNECTION, 'session closed');
          await this.detect(false);
        }
      }
    }
  }

  /** One detection pass (`all`: every chunk, e.g. the initial sync); a non-empty result becomes the next generation. */
  private async detect(all: boolean): Promise<void> {
    const started = Date.now();
    this.lastDetectAt = started;
    const s = this.state;
    const { bitmap, readBytes, baseLost } = await this.source!.detect(s.generation + 1, { all, signal: this.signal });
    if (baseLost) {
      gens.requireReconcile(s, `the ${this.source!.mode} change source lost its tracking state (no base to compare with)`);
      await this.r.store.save();
      return;
    }
    this.allocatedBytes = totalBytes(await this.volume!.allocated());
    if (bitmap.isEmpty) {
      this.r.log.debug({ readBytes, ms: Date.now() - started }, 'no changes');
      return;
    }
    await this.createGeneration(bitmap, started, readBytes);
  }

  /** Bitmap first, then the state that names it pending. */
  private async createGeneration(bitmap: RoaringBitmap32, detectedAt: number, readBytes: number): Promise<void> {
    const s = this.state;
    await this.bitmaps.save(s.generation + 1, bitmap);
    const gen = gens.createGeneration(s, detectedAt);
    await this.r.store.save();
    const changedBytes = this.bytesOf(bitmap);
    this.cycle = { generation: gen, started: detectedAt, readBefore: this.counters.readBytes, detectReadBytes: readBytes, changedBytes, wireAtStart: this.wireBytes() };
    this.r.log.info({ generation: gen, chunks: bitmap.size, changedBytes }, 'generation created');
  }

  private bytesOf(bitmap: RoaringBitmap32): number {
    return gens.bitmapBytes(bitmap, this.state.chunkSize, this.state.volumeSize);
  }

  /** Tracking state was lost: freeze a view as the next generation and make the chunks that differ from the secondary's digests that generation. */
  private async reconcile(session: Session, reason: string): Promise<void> {
    const s = this.state;
    const gen = s.generation + 1;
    const started = Date.now();
    this.phase = 'reconciling';
    this.lastDetectAt = started;
    const report: ReconcileReport = { reason, generation: gen, doneBytes: 0, totalBytes: s.volumeSize, differingBytes: 0, finished: false };
    this.reconcileReport = report;
    this.r.log.warn({ reason, generation: gen }, 'tracking state lost: comparing digests with the secondary');
    const source = this.source!;
    await source.detect(gen, { all: true, signal: this.signal });
    const view = await source.view(gen);
    const { bitmap, readBytes } = await reconcileByDigests(session, view, {
      chunkSize: s.chunkSize,
      report,
      recordSent: (c, d, n) => source.recordSent(c, d, n),
      signal: this.signal,
      peerTimeout: this.r.config.peerTimeout ?? DEFAULT_PEER_TIMEOUT,
      bytesOf: (b) => this.bytesOf(b),
    });
    await this.createGeneration(bitmap, started, readBytes);
    report.finished = true;
    this.r.log.info({ generation: gen, differingBytes: report.differingBytes, readBytes, seconds: (Date.now() - started) / 1000 }, 'digests compared: the chunks that differ become the next generation');
  }

  private async sendGeneration(session: Session, gen: number, resumeFrom: number): Promise<void> {
    const s = this.state;
    const c = this.r.config;
    const source = this.source!;
    const bitmap = await this.bitmaps.load(gen);
    const view = await source.view(gen);
    this.phase = s.committedGeneration === 0 ? 'initial-sync' : 'syncing';
    const sender = new Sender(
      view,
      { generation: gen, bitmap, resumeFrom, recordSent: (chunk, data, count) => source.recordSent(chunk, data, count) },
      session,
      {
        chunkSize: s.chunkSize,
        maxExtent: c.maxExtent,
        maxInFlight: c.maxInFlight,
        signal: this.signal,
        peerTimeout: c.peerTimeout ?? DEFAULT_PEER_TIMEOUT,
        ...(this.r.ctx.throttle ? { throttle: this.r.ctx.throttle } : {}),
        onDurable: (durable) => void gens.advanceCursor(s, durable),
        // Digests first, then the cursor.
        persist: async () => {
          await source.persist();
          await this.r.store.save();
        },
      },
      this.counters,
    );
    this.sender = sender;
    this.cycle ??= { generation: gen, started: Date.now(), readBefore: this.counters.readBytes, detectReadBytes: 0, changedBytes: sender.progress.totalBytes, wireAtStart: this.wireBytes() };
    this.r.log.info({ generation: gen, resumeFrom, totalBytes: sender.progress.totalBytes, doneBytes: sender.progress.doneBytes }, resumeFrom > 0 ? 'resuming generation' : 'sending generation');
    await sender.run();
    await this.markCommitted(gen);
  }

  /** The secondary committed `gen`: tracking state first (a stale digest only causes a resend), then the state, then the bitmap goes. */
  private async markCommitted(gen: number): Promise<void> {
    const s = this.state;
    await this.source!.persist();
    gens.commitGeneration(s, gen);
    await this.r.store.save();
    await this.source!.committed(gen);
    await this.bitmaps.remove(gen);
    const cy = this.cycle;
    if (cy && cy.generation === gen) {
      this.lastCycle = {
        generation: gen,
        changedBytes: cy.changedBytes,
        readBytes: cy.detectReadBytes + this.counters.readBytes - cy.readBefore,
        wireBytes: this.wireBytes() - cy.wireAtStart,
        durationSeconds: (Date.now() - cy.started) / 1000,
      };
    }
    this.cycle = null;
    this.sender = null;
    this.phase = 'in-sync';
    this.r.log.info({ generation: gen, lastCycle: this.lastCycle }, 'generation committed by the secondary');
  }

  private wireBytes(): number {
    return this.wireBytesBase + (this.session?.counters.bytesOut ?? 0);
  }

  status(): MirrorStatus {
    const s = this.r.store.state;
    const c = this.r.config;
    const progress: Progress | null = this.sender ? { ...this.sender.progress } : null;
    const pendingBytes = progress ? progress.totalBytes - progress.doneBytes : 0;
    return {
      name: c.name,
      role: 'primary',
      state: this.phase,
      volume: c.volume,
      peer: c.peer ?? null,
      trackingMode: this.source?.mode ?? c.tracking.mode,
      chunkSize: c.chunkSize,
      volumeBytes: s?.volumeSize ?? 0,
      allocatedBytes: this.allocatedBytes,
      sentBytes: this.counters.sentBytes,
      appliedBytes: 0,
      wireBytes: this.wireBytes(),
      dirtyBytes: s?.pending != null ? pendingBytes || (this.cycle?.changedBytes ?? 0) : 0,
      generation: s?.generation ?? 0,
      committedGeneration: s?.committedGeneration ?? 0,
      lagSeconds: s ? gens.lagSeconds(s, Date.now()) : null,
      progress,
      lastCycle: this.lastCycle,
      reconcile: this.reconcileReport ? { ...this.reconcileReport } : null,
      error: this.lastError ? this.lastError.toJSON() : null,
      sessions: this.sessions,
      connectedSince: this.connectedSince ? this.connectedSince.toISOString() : null,
    };
  }
}
