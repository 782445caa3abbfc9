import { randomBytes } from 'node:crypto';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { BitmapStore, RoaringBitmap32 } from '../track/bitmap-store.js';
import { createSource } from '../track/index.js';
import type { ChangeSource, DetectSteps } from '../track/source.js';
import { sleep } from '../util/sleep.js';
import { allocatedBytesOf, type Volume } from '../volume/volume.js';
import { HANDSHAKE_TIMEOUT_MS, primaryHandshake } from '../wire/handshake.js';
import type { HistoryMsg } from '../wire/messages.js';
import type { Session } from '../wire/session.js';
import type { RoleContext } from './context.js';
import { loadDivergent, removeDivergent } from './divergence.js';
import * as gens from './generations.js';
import { appendHistory, compareHistories, describeGen, newGenId, sameGen, withPending, type GenId } from './history.js';
import { reconcileByDigests } from './reconcile.js';
import { CompressionPolicy } from './compression.js';
import { Sender, type SendCounters } from './sender.js';
import { DEFAULT_PEER_TIMEOUT } from './settings.js';
import { newState, type MirrorState, type SplitBrain } from './state.js';
import type { CycleReport, MirrorStatus, PrimaryPhase, Progress, ReconcileReport } from './status.js';
import { roleStatus } from './role-status.js';

/** Codes after which retrying soon cannot help: back off to the maximum at once. */
const REFUSALS = new Set<string>([
  ErrorCodes.AUTH_FAILED,
  ErrorCodes.VERSION_MISMATCH,
  ErrorCodes.UNKNOWN_MIRROR,
  ErrorCodes.SIZE_MISMATCH,
  ErrorCodes.CHUNK_SIZE_MISMATCH,
  ErrorCodes.IDENTITY_MISMATCH,
  ErrorCodes.TLS,
  ErrorCodes.SPLIT_BRAIN,
  ErrorCodes.CONFIG,
]);

/** How long a split brain's figure of the bytes changed here is reused (ms). */
const CHANGED_BYTES_TTL_MS = 30_000;

/** What the peer said in its history frame, as this primary uses it for the session. */
interface PeerChanges {
  /** Chunks the secondary changed that the next generation must overwrite (null: none). */
  bitmap: RoaringBitmap32 | null;
  /** The generation that carries them (begin.withPeerChanges), once created. */
  coveredBy: number | null;
}

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
  /** Whether data is compressed: one policy for the role's life, so that auto learns across generations and sessions. */
  private readonly compression: CompressionPolicy;
  private wireBytesBase = 0;
  private allocatedBytes = 0;
  private sender: Sender | null = null;
  private lastCycle: CycleReport | null = null;
  /** The generation being sent: when its detection started, and the counters then. */
  private cycle: {
    generation: number;
    started: number;
    readBefore: number;
    detectReadBytes: number;
    changedBytes: number;
    wireAtStart: number;
    /** Detection's steps (seconds), when this daemon's pass created the generation. */
    detectSteps?: DetectSteps & { save: number };
  } | null = null;
  /** When the last detection pass that found nothing changed took its view (Unix ms): the replica's image is that recent (memory only). */
  private seenAt: number | null = null;
  private lastDetectAt = 0;
  private reconcileReport: ReconcileReport | null = null;
  private sessions = 0;
  private connectedSince: Date | null = null;
  /** The secondary's divergent chunks reported in this session (reverse resync). */
  private peerChanges: PeerChanges | null = null;
  /** A planned switchover asked (Mirror.switchover): settled once the secondary agreed. */
  private switchReq: { resolve: (gen: number) => void; reject: (e: TmError) => void } | null = null;
  /** Detection passes, one at a time (the loop's, and a split brain's or a demote's measure). */
  private detecting: Promise<unknown> = Promise.resolve();
  private halted = false;
  /** The last {@link changedBytes} figure and when it was measured. */
  private changedMeasure: { at: number; bytes: number | null } | null = null;
  /** Resolved to cut the loop's wait short (a switchover was asked). */
  private wake = resolvers();
  /** The volume was the image of the committed generation when this role started (a promote): take it as the tracking base. */
  rebaseAtStart = false;

  constructor(private readonly r: RoleContext) {
    this.bitmaps = new BitmapStore(r.store.dir);
    this.compression = new CompressionPolicy(r.config.compression ?? 'auto');
  }

  /** The state as last saved; a new object after each update (never keep it across one). */
  private get state(): Readonly<MirrorState> {
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
      if (this.rebaseAtStart) await this.rebase(s);
      this.allocatedBytes = await allocatedBytesOf(volume);
      this.r.log.info({ generation: s.generation, committedGeneration: s.committedGeneration, pending: s.pending, volumeBytes: s.volumeSize, allocatedBytes: this.allocatedBytes }, 'primary mirror ready');
    } catch (e) {
      await volume.close();
      this.volume = null;
      throw e;
    }
    this.loopDone = this.run();
  }

  /**
   * A promoted replica: the volume holds the committed generation's image, so
   * it becomes the change source's base. The state asks for a digest
   * comparison until this is done, so a crash before it is still safe.
   */
  private async rebase(s: Readonly<MirrorState>): Promise<void> {
    const src = this.source!;
    if (!src.rebase) {
      const why = `promoted at generation ${s.committedGeneration}: the ${src.mode} change source cannot take the volume as its base; comparing digests with the peer`;
      await this.r.store.update((n) => gens.requireReconcile(n, why));
      return;
    }
    const t0 = Date.now();
    await src.rebase(s.committedGeneration);
    await this.r.store.update((n) => {
      n.reconcile = null;
    });
    this.r.log.info({ generation: s.committedGeneration, trackingMode: src.mode, seconds: (Date.now() - t0) / 1000 }, 'tracking base taken from the promoted volume');
  }

  /** Stop replicating (`abort`: drop the session at once instead of closing it); tracking state is persisted. Idempotent. */
  async stop(abort = false): Promise<void> {
    await this.halt(abort);
    await this.closeAll();
  }

  /** End the replication loop (and its session); the volume and the change source stay open. */
  async halt(abort = false): Promise<void> {
    this.halted = true;
    this.abort.abort();
    this.switchReq?.reject(new TmError(ErrorCodes.ABORTED, `mirror ${this.r.config.name} is stopping`));
    this.switchReq = null;
    if (abort) this.session?.destroy();
    else this.session?.close();
    await this.loopDone;
  }

  private async closeAll(): Promise<void> {
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
          await this.r.store.update((n) => {
            n.peerNode = peerNode;
          });
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
    const peer = await this.exchangeHistory(session);
    const done = gens.committedMeanwhile(this.state, peerCommitted);
    if (done !== null) await this.markCommitted(done);
    await this.r.store.update((s) => gens.reconcileAfterHandshake(s, peerCommitted, applying));
    let resume = gens.resumeCursor(this.state, applying);
    resume = await this.takePeerChanges(peer, resume);
    if (this.state.splitBrain) {
      await this.r.store.update((s) => {
        s.splitBrain = null;
      });
      this.r.log.info('split brain resolved: the peer is secondary again');
    }
    while (!this.signal.aborted) {
      const step = gens.nextStep(this.state);
      switch (step.kind) {
        case 'send':
          await this.sendGeneration(session, step.generation, resume);
          resume = 0;
          break;
        case 'reconcile':
          await this.reconcile(session, step.reason);
          break;
        case 'initial-sync':
          await this.detect(true, session);
          break;
        case 'wait': {
          this.phase = 'in-sync';
          if (this.switchReq) {
            if (await this.switchoverStep(session)) return;
            break;
          }
          // The secondary's divergent chunks go at once, in a generation of their own if nothing else changed.
          const wait = this.peerChanges?.bitmap && this.peerChanges.coveredBy === null ? 0 : Math.max(0, this.lastDetectAt + this.r.config.tracking.interval * 1000 - Date.now());
          await sleep(wait, this.signal, Promise.race([session.closed, this.wake.promise]));
          if (this.signal.aborted) return;
          if (!session.isOpen) throw (await session.closed) ?? new TmError(ErrorCodes.CONNECTION, 'session closed');
          await this.detect(false, session);
        }
      }
    }
  }

  /**
   * One detection pass (`all`: every chunk, e.g. the initial sync); a
   * non-empty result becomes the next generation. An empty one says the
   * replica is the volume as it was when the pass's view was taken: the lag
   * counts from then (here and, by an `unchanged` frame, on the secondary).
   */
  private async detect(all: boolean, session: Session | null): Promise<void> {
    const started = Date.now();
    this.lastDetectAt = started;
    const { bitmap, readBytes, baseLost, viewAt = started, steps } = await this.detectPass(this.state.generation + 1, { all, signal: this.signal });
    if (baseLost) {
      const why = `the ${this.source!.mode} change source lost its tracking state (no base to compare with)`;
      await this.r.store.update((s) => gens.requireReconcile(s, why));
      return;
    }
    const t = performance.now();
    this.allocatedBytes = await allocatedBytesOf(this.volume!);
    await this.mergeDivergence(bitmap);
    if (bitmap.isEmpty) {
      const s = this.state;
      if (s.pending === null && !s.reconcile && s.committedGeneration > 0) {
        this.seenAt = Math.max(this.seenAt ?? 0, viewAt);
        if (session?.isOpen) session.send({ type: 'unchanged', generation: s.committedGeneration, viewAt });
      }
      this.r.log.debug({ readBytes, ms: Date.now() - started }, 'no changes');
      return;
    }
    await this.createGeneration(bitmap, started, readBytes, viewAt);
    if (this.cycle) this.cycle.detectSteps = { ...steps, save: (performance.now() - t) / 1000 };
  }

  private detectPass(gen: number, o: { all?: boolean; signal?: AbortSignal }) {
    const run = this.detecting.then(() => this.source!.detect(gen, o));
    this.detecting = run.catch(() => {});
    return run;
  }

  /**
   * Add what must also go in the next generation: this side's own divergent
   * chunks (a promoted side that was demoted with changes the peer never
   * committed) and the secondary's (reverse resync).
   */
  private async mergeDivergence(bitmap: RoaringBitmap32): Promise<void> {
    const d = this.state.divergence;
    if (d && !d.unknown) bitmap.orInPlace(await loadDivergent(this.r.store.dir));
    const p = this.peerChanges;
    if (p?.bitmap && p.coveredBy === null) bitmap.orInPlace(p.bitmap);
  }

  /** Bitmap first, then the state that names it pending. */
  private async createGeneration(bitmap: RoaringBitmap32, detectedAt: number, readBytes: number, viewAt = detectedAt): Promise<void> {
    await this.bitmaps.save(this.state.generation + 1, bitmap);
    const node = this.r.ctx.nodeName;
    const gen = await this.r.store.update((s) => {
      const g = gens.createGeneration(s, detectedAt, viewAt);
      s.pendingGid = newGenId(node, g);
      if (s.divergence && !s.divergence.unknown) s.divergence.coveredBy = g;
      return g;
    });
    if (this.peerChanges?.bitmap && this.peerChanges.coveredBy === null) this.peerChanges.coveredBy = gen;
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
    await this.detectPass(gen, { all: true, signal: this.signal });
    const view = await source.view(gen);
    const { bitmap, readBytes } = await reconcileByDigests(session, view, {
      chunkSize: s.chunkSize,
      report,
      recordSent: (c, d, n) => source.recordSent(c, d, n),
      signal: this.signal,
      peerTimeout: this.r.config.peerTimeout ?? DEFAULT_PEER_TIMEOUT,
      bytesOf: (b) => this.bytesOf(b),
    });
    if (this.peerChanges && this.peerChanges.coveredBy === null) this.peerChanges.coveredBy = gen;
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
    /** Bytes of `gen` the secondary reported durable; the state's cursor follows at each checkpoint. */
    let durable = s.cursor;
    this.phase = s.committedGeneration === 0 ? 'initial-sync' : 'syncing';
    const sender = new Sender(
      view,
      {
        generation: gen,
        bitmap,
        resumeFrom,
        recordSent: (chunk, data, count) => source.recordSent(chunk, data, count),
        ...(source.recordDigests ? { recordDigests: (chunk: number, digests: Buffer) => source.recordDigests!(chunk, digests) } : {}),
        ...(s.pendingGid && s.pendingGid.generation === gen ? { gid: s.pendingGid } : {}),
        ...(this.peerChanges && this.peerChanges.coveredBy === gen ? { withPeerChanges: true } : {}),
        ...(s.pendingViewAt != null && s.pending === gen ? { viewAt: s.pendingViewAt } : {}),
      },
      session,
      {
        chunkSize: s.chunkSize,
        maxExtent: c.maxExtent,
        maxInFlight: c.maxInFlight,
        signal: this.signal,
        peerTimeout: c.peerTimeout ?? DEFAULT_PEER_TIMEOUT,
        compression: this.compression,
        ...(this.r.ctx.throttle ? { throttle: this.r.ctx.throttle } : {}),
        onDurable: (d) => void (durable = Math.max(durable, d)),
        // Digests first, then the cursor (the furthest the secondary reported when this checkpoint starts).
        persist: async () => {
          await source.persist();
          const cursor = durable;
          await this.r.store.update((n) => n.pending === gen && gens.advanceCursor(n, cursor));
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
    await this.source!.persist();
    const node = this.r.ctx.nodeName;
    const dropDivergent = await this.r.store.update((s) => {
      const gid = s.pendingGid && s.pendingGid.generation === gen ? s.pendingGid : newGenId(node, gen);
      gens.commitGeneration(s, gen);
      // Generation 1 is a full sync: the chain starts again there.
      s.history = appendHistory(s.history, gid, gen === 1);
      s.pendingGid = null;
      const drop = s.divergence?.coveredBy === gen;
      if (drop) s.divergence = null;
      return { drop }; // never `false`: that would skip the save
    });
    if (this.peerChanges?.coveredBy === gen) this.peerChanges = null;
    if (dropDivergent.drop) await removeDivergent(this.r.store.dir);
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
        ...(cy.detectSteps && this.sender
          ? {
              steps: {
                snapshot: cy.detectSteps.snapshot ?? 0,
                fiemap: cy.detectSteps.fiemap ?? 0,
                diff: cy.detectSteps.diff ?? 0,
                save: cy.detectSteps.save,
                ...this.sender.steps,
              },
            }
          : {}),
      };
    }
    this.cycle = null;
    this.sender = null;
    this.phase = 'in-sync';
    this.r.log.info({ generation: gen, lastCycle: this.lastCycle }, 'generation committed by the secondary');
  }

  // ---- issue 12: histories, reverse resync, split brain, switchover ----

  /** This side's history frame: its chain, its pending generation, and what it changed that the peer may not hold. */
  private historyMsg(changedBytes: number | null): HistoryMsg {
    const s = this.state;
    return { type: 'history', role: 'primary', ids: s.history ?? [], pending: s.pendingGid ?? null, changedBytes, divergent: null, unknown: false };
  }

  /**
   * Send our history, take the secondary's, and decide: go on, overwrite its
   * divergent chunks too (reverse resync), compare digests (no common
   * generation), or refuse (split brain). Returns the peer's frame.
   */
  private async exchangeHistory(session: Session): Promise<HistoryMsg> {
    const s = this.state;
    session.send(this.historyMsg(null));
    const m = await session.next(HANDSHAKE_TIMEOUT_MS);
    if (m.type !== 'history') throw new TmError(ErrorCodes.PROTOCOL, `expected the secondary's history frame, got ${m.type}`);
    const mine = withPending(s.history, s.pendingGid);
    if (m.role === 'primary') {
      throw await this.splitBrain(session, m, compareHistories(mine, m.ids).common, `both sides are primary (${session.peerName} was promoted too)`);
    }
    if (mine.length > 0 && m.ids.length > 0) {
      const cmp = compareHistories(mine, m.ids);
      if (cmp.common && cmp.remoteAhead.length > 0) {
        throw await this.splitBrain(
          session,
          m,
          cmp.common,
          `the secondary committed ${cmp.remoteAhead.length} generation(s) this primary never created (${cmp.remoteAhead.map((g) => describeGen(g)).join(', ')}) after ${describeGen(cmp.common)}`,
        );
      }
      if (!cmp.common) {
        const why = `the histories share no generation (this side's last: ${describeGen(mine.at(-1))}, the secondary's: ${describeGen(m.ids.at(-1))}): comparing digests instead of resending everything`;
        await this.r.store.update((n) => gens.requireReconcile(n, why));
      } else if (sameGen(cmp.common, s.pendingGid)) {
        // The secondary committed our pending generation; the acknowledgement was lost.
        await this.markCommitted(s.pendingGid!.generation);
      }
    }
    return m;
  }

  /**
   * The secondary's divergent chunks (it was a primary, demoted with changes
   * this side never got): they go in the next generation, or into the pending
   * one (resent from the start unless it already holds them all). Unknown
   * chunks: compare digests. Returns where the pending generation resumes.
   */
  private async takePeerChanges(m: HistoryMsg, resume: number): Promise<number> {
    const s = this.state;
    this.peerChanges = null;
    if (m.unknown) {
      // A pending generation goes first (nextStep), then the comparison, which covers every chunk.
      this.peerChanges = { bitmap: null, coveredBy: null };
      const why = `the secondary changed chunks it cannot name since ${describeGen(m.ids.at(-1))} (${m.changedBytes ?? 'unknown'} bytes): comparing digests`;
      await this.r.store.update((n) => gens.requireReconcile(n, why));
      return resume;
    }
    if (!m.divergent) return resume;
    let b: RoaringBitmap32;
    try {
      b = RoaringBitmap32.deserialize(m.divergent, 'portable');
    } catch (e) {
      throw new TmError(ErrorCodes.PROTOCOL, `the secondary's divergent chunks are not a valid bitmap: ${(e as Error).message}`);
    }
    const chunks = Math.ceil(s.volumeSize / s.chunkSize);
    if (!b.isEmpty && b.maximum() >= chunks) throw new TmError(ErrorCodes.PROTOCOL, `the secondary's divergent chunks name chunk ${b.maximum()}, beyond the volume's ${chunks}`);
    if (b.isEmpty) return resume;
    this.r.log.warn({ chunks: b.size, bytes: this.bytesOf(b) }, 'the secondary holds chunks it changed as a primary: they are overwritten with this side\'s (reverse resync)');
    if (s.pending !== null) {
      const pend = await this.bitmaps.load(s.pending);
      const covered = pend.isSupersetOf(b);
      if (!covered) {
        pend.orInPlace(b);
        await this.bitmaps.save(s.pending, pend);
        resume = 0;
      }
      this.peerChanges = { bitmap: b, coveredBy: s.pending };
      if (this.cycle && this.cycle.generation === s.pending) this.cycle.changedBytes = this.bytesOf(pend);
      return resume;
    }
    this.peerChanges = { bitmap: b, coveredBy: null };
    return resume;
  }

  /** Record the split brain (status shows it), tell the peer our figures, and return the error that ends the session. */
  private async splitBrain(session: Session, m: HistoryMsg, common: GenId | null, why: string): Promise<TmError> {
    const local = await this.changedBytes().catch(() => null);
    const s = this.state;
    const rec: SplitBrain = { detectedAt: Date.now(), peerNode: s.peerNode ?? session.peerName, common, localBytes: local, peerBytes: m.changedBytes, why };
    await this.r.store.update((n) => {
      n.splitBrain = rec;
    });
    const err = splitBrainError(this.r.config.name, rec);
    if (session.isOpen) session.fail(err);
    return err;
  }

  /**
   * Bytes this side changed since its last committed generation: the pending
   * generation, its own divergent chunks, and what a detection pass finds now
   * (null when the change source lost its base).
   */
  async changedBytes(): Promise<number | null> {
    // Both sides of a split brain keep reconnecting and are refused each time: measure at
    // most every CHANGED_BYTES_TTL_MS, not a detection pass (a whole read, for scan) per attempt.
    const m = this.changedMeasure;
    if (m && Date.now() - m.at < CHANGED_BYTES_TTL_MS) return m.bytes;
    const b = await this.changedSinceCommitted();
    const bytes = b ? this.bytesOf(b) : null;
    this.changedMeasure = { at: Date.now(), bytes };
    return bytes;
  }

  /** The chunks of {@link changedBytes}, or null when they cannot be known. */
  async changedSinceCommitted(): Promise<RoaringBitmap32 | null> {
    const s = this.state;
    const all = new RoaringBitmap32();
    for (const g of await this.bitmaps.list()) if (g > s.committedGeneration) all.orInPlace(await this.bitmaps.load(g));
    if (s.divergence?.unknown) return null;
    if (s.divergence) all.orInPlace(await loadDivergent(this.r.store.dir));
    const d = await this.detectPass(s.generation + 1, {});
    if (d.baseLost) return null;
    all.orInPlace(d.bitmap);
    return all;
  }

  /**
   * Serve a session from a peer that believes it is primary, while this side
   * is primary too: answer the handshake and the history exchange with our
   * figures, record the split brain and refuse. Nothing is written.
   */
  async refuseAsPrimary(session: Session, volumeId: string, peerNode: string): Promise<void> {
    const s = this.state;
    if (s.volumeId !== volumeId) {
      throw new TmError(ErrorCodes.IDENTITY_MISMATCH, `mirror ${this.r.config.name}: the peer's volume id ${volumeId} is not ${s.volumeId}, and this side is primary`);
    }
    session.send({ type: 'ready', committedGeneration: s.committedGeneration, applying: null });
    const m = await session.next(HANDSHAKE_TIMEOUT_MS);
    if (m.type !== 'history') throw new TmError(ErrorCodes.PROTOCOL, `expected the peer's history frame, got ${m.type}`);
    const mine = withPending(s.history, s.pendingGid);
    const local = await this.changedBytes().catch(() => null);
    session.send({ ...this.historyMsg(local) });
    // The connecting side tells its changed bytes only in answer to ours (when it connects to us): keep what it said last time.
    const prev = s.splitBrain;
    const rec: SplitBrain = {
      detectedAt: Date.now(),
      peerNode,
      common: compareHistories(mine, m.ids).common,
      localBytes: local,
      peerBytes: m.changedBytes ?? prev?.peerBytes ?? null,
      why: 'both sides are primary',
    };
    await this.r.store.update((n) => {
      n.splitBrain = rec;
    });
    this.r.log.error({ code: ErrorCodes.SPLIT_BRAIN, common: rec.common, localBytes: local, peerBytes: m.changedBytes }, 'split brain: a primary connected while this side is primary too');
    throw splitBrainError(this.r.config.name, rec);
  }

  /**
   * A planned switchover (issue 12 §3): no new generation is created after the
   * last one the secondary commits; resolves with that generation once the
   * secondary has agreed to be promoted at it. The session stays open until
   * the Mirror halts this role (after it has recorded the demotion).
   */
  switchover(timeoutMs: number): Promise<number> {
    if (!this.session || this.phase === 'connecting' || this.phase === 'error') {
      return Promise.reject(new TmError(ErrorCodes.CONNECTION, `mirror ${this.r.config.name}: switchover needs the peer connected (state ${this.phase}); use demote and promote when it is gone`));
    }
    if (this.switchReq) return Promise.reject(new TmError(ErrorCodes.ROLE, `mirror ${this.r.config.name}: a switchover is already running`));
    const p = new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.switchReq = null;
        reject(new TmError(ErrorCodes.TIMEOUT, `mirror ${this.r.config.name}: switchover did not finish within ${timeoutMs / 1000} s; nothing changed roles`));
      }, timeoutMs);
      this.switchReq = {
        resolve: (g) => (clearTimeout(timer), resolve(g)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      };
    });
    // Cut the loop's wait short (a fresh wake for the waits after this one).
    const w = this.wake;
    this.wake = resolvers();
    w.resolve();
    return p;
  }

  /**
   * One step of a switchover, in the loop's place of waiting: detect now; with
   * changes, they become a generation (sent next); with none, ask the
   * secondary to take over at the committed generation. True once it agreed.
   */
  private async switchoverStep(session: Session): Promise<boolean> {
    const s = this.state;
    const before = s.generation;
    await this.detect(false, session);
    if (s.generation !== before || s.reconcile) return false;
    session.send({ type: 'switchover', generation: s.committedGeneration });
    const m = await session.next(HANDSHAKE_TIMEOUT_MS);
    if (m.type !== 'switched' || m.generation !== s.committedGeneration) {
      throw new TmError(ErrorCodes.PROTOCOL, `switchover: expected switched(${s.committedGeneration}) from the secondary, got ${m.type}`);
    }
    this.r.log.info({ generation: s.committedGeneration }, 'switchover: the secondary holds the last generation and takes over');
    const req = this.switchReq!;
    this.switchReq = null;
    req.resolve(s.committedGeneration);
    // Nothing more is sent: wait for the Mirror to halt this role.
    await sleep(2 ** 31 - 1, this.signal);
    return true;
  }

  /** Before a demote: the loop is halted; forget tracking state (its files go). */
  async dropTracking(): Promise<void> {
    for (const g of await this.bitmaps.list()) await this.bitmaps.remove(g);
    await this.source?.drop?.();
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
      // While a comparison by digests is due, the replica may not hold what the last unchanged pass was compared with.
      lagSeconds: s ? gens.lagSeconds(s, Date.now(), s.reconcile ? null : this.seenAt) : null,
      progress,
      lastCycle: this.lastCycle,
      reconcile: this.reconcileReport ? { ...this.reconcileReport } : null,
      compression: this.compression.status(),
      ...roleStatus(s, c.name),
      error: this.lastError ? this.lastError.toJSON() : null,
      sessions: this.sessions,
      connectedSince: this.connectedSince ? this.connectedSince.toISOString() : null,
    };
  }
}

/** The refusal both sides of a split brain give, naming the command that resolves it. */
export function splitBrainError(mirror: string, r: SplitBrain): TmError {
  return new TmError(
    ErrorCodes.SPLIT_BRAIN,
    `mirror ${mirror}: split brain with ${r.peerNode}: ${r.why}; last common ${describeGen(r.common)}; changed here ${r.localBytes ?? 'unknown'} bytes, there ${r.peerBytes ?? 'unknown'} bytes; nothing was written. Resolve with: thinmirror resolve ${mirror} --discard-local, on the side whose changes are thrown away`,
  );
}

function resolvers(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}
