import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { allocatedBytesOf, type Volume } from '../volume/volume.js';
import { HANDSHAKE_TIMEOUT_MS, refuse } from '../wire/handshake.js';
import type { AuthMsg, HelloMsg, HistoryMsg, ReadyMsg } from '../wire/messages.js';
import type { Session } from '../wire/session.js';
import type { RoleContext } from './context.js';
import { Consistency, rollbackTarget } from './consistency.js';
import { serializeBitmap } from '../track/bitmap-store.js';
import { loadDivergent, removeDivergent } from './divergence.js';
import { Drills } from './drill.js';
import { lagSeconds } from './generations.js';
import { appendHistory, compareHistories, describeGen, withPending } from './history.js';
import { splitBrainError } from './primary-role.js';
import { Receiver, type Applying, type ReplicaRecord } from './receiver.js';
import { newState, type MirrorState, type SplitBrain } from './state.js';
import type { MirrorStatus, Progress, SecondaryPhase } from './status.js';
import { roleStatus } from './role-status.js';

/**
 * How long the allocated figure of the target in status is reused (ms), at
 * least; and at least this many times as long as the last walk of the map took
 * (a map of a million extents takes seconds to walk: it is refreshed rarely).
 */
const ALLOCATED_TTL_MS = 2000;
const ALLOCATED_WALK_FACTOR = 20;

/**
 * What a Mirror runs while its role is secondary. Takes sessions the daemon
 * has authenticated, checks the volume identity against the state, opens the
 * target (from this host's config, never from the wire) and runs a
 * {@link Receiver} on it until the session ends. A new session replaces a
 * running one: its peer may be gone without the socket having noticed.
 */
export class SecondaryRole {
  readonly role = 'secondary' as const;
  private phase: SecondaryPhase = 'waiting';
  private lastError: TmError | null = null;
  private session: Session | null = null;
  private receiver: Receiver | null = null;
  private sessionDone: Promise<void> = Promise.resolve();
  private accepting: Promise<void> = Promise.resolve();
  private consistency: Consistency | null = null;
  private appliedBase = 0;
  private wireBytesBase = 0;
  /** The target's allocated bytes as last mapped: when, and how long the walk took (ms). */
  private allocated: { at: number; bytes: number; ms: number } = { at: 0, bytes: 0, ms: 0 };
  /** The walk refreshing {@link allocated}, while one runs (never awaited by status). */
  private refreshing: Promise<void> | null = null;
  /** The latest `unchanged` frame's view time for the committed generation it named (memory only: a restart counts from the state's older committedViewAt). */
  private seenAt: { generation: number; at: number } | null = null;
  private stopped = false;
  private sessions = 0;
  private connectedSince: Date | null = null;
  /**
   * The replica's turn: ReplicaRecord.begin and saveCommitted run in it, and
   * so does a drill while it picks the consistent image and clones it. Held
   * by neither, `applying` cannot go from null to a generation (no target
   * write can start) nor back (the base image cannot go).
   */
  private replicaTurn: Promise<unknown> = Promise.resolve();
  /** The drills of this replica (issue 11 §3, docs/drills.md). */
  readonly drills: Drills;

  constructor(private readonly r: RoleContext) {
    this.drills = new Drills({ config: r.config, store: r.store, log: r.log, consistency: () => this.resolveConsistency(), exclusive: (job) => this.exclusive(job) });
  }

  private exclusive<T>(job: () => Promise<T>): Promise<T> {
    const run = this.replicaTurn.then(job);
    this.replicaTurn = run.catch(() => {});
    return run;
  }

  /** The consistency mode; before the first session resolves it, resolved here on the existing target (a drill asks). */
  private async resolveConsistency(): Promise<Consistency> {
    if (this.consistency) return this.consistency;
    const v = await this.r.openVolume(this.r.config.volume, { readOnly: true });
    try {
      const c = await Consistency.pick(this.r.config, this.r.store.dir, v, this.r.log);
      return (this.consistency ??= c);
    } finally {
      await v.close();
    }
  }

  private get name(): string {
    return this.r.config.name;
  }

  async start(): Promise<void> {
    const s = this.r.store.state;
    if (s) await this.lookAtTarget(s.committedGeneration, s.applying === null);
    await this.drills.removeStaleTemps();
    this.r.log.info({ committedGeneration: s?.committedGeneration ?? 0, applying: s?.applying ?? null }, 'secondary mirror ready');
  }

  /**
   * One look at the target at start, if it exists: with nothing being applied
   * (`idle`), finish an interrupted rollback; then note its allocated bytes for
   * status until the first session.
   *
   * A base image or journal left while nothing is applied means a rollback was
   * interrupted (it records `applying: null` first) or a crash came between
   * preparing a generation and recording it. Either way restoring the committed
   * image is what must happen.
   */
  private async lookAtTarget(committed: number, idle: boolean): Promise<void> {
    let v: Volume;
    try {
      v = await this.r.openVolume(this.r.config.volume, idle ? {} : { readOnly: true });
    } catch {
      return; // no target yet: nothing to restore or report
    }
    try {
      if (idle) {
        const r = await rollbackTarget(this.r.config, this.r.store.dir, v, committed, this.r.log);
        if (r.generation !== null) this.r.log.warn({ mode: r.mode, committedGeneration: committed, bytes: r.bytes }, 'an interrupted rollback was completed: the target holds the committed generation');
      }
    } finally {
      await v.close();
    }
    // Only a figure for status, mapped beside the start rather than before it.
    this.refreshAllocated(true);
  }

  /** A primary's session is running (promote then needs --force). */
  get peerConnected(): boolean {
    return this.session !== null && this.session.isOpen;
  }

  /** Take an authenticated session for this mirror (replacing a running one). */
  accept(session: Session, hello: HelloMsg, auth: AuthMsg): Promise<void> {
    // One accept at a time: two sessions racing through the checks must not
    // both end up applying to the target.
    const run = this.accepting.then(() => this.acceptNow(session, hello, auth));
    this.accepting = run.catch(() => {});
    return run;
  }

  private async acceptNow(session: Session, hello: HelloMsg, auth: AuthMsg): Promise<void> {
    const c = this.r.config;
    if (this.stopped) throw refuse(session, new TmError(ErrorCodes.CONNECTION, `mirror ${this.name} on this node is shutting down`));
    if (this.session) {
      this.r.log.warn({ peer: hello.node }, 'new session replaces the running one');
      this.session.destroy(new TmError(ErrorCodes.CONNECTION, 'replaced by a new session'));
      await this.sessionDone;
    }
    let raw: Volume | undefined;
    let target: Volume | undefined;
    try {
      if (auth.chunkSize !== c.chunkSize) {
        throw refuse(
          session,
          new TmError(ErrorCodes.CHUNK_SIZE_MISMATCH, `mirror ${this.name}: the primary uses chunks of ${auth.chunkSize} bytes, this node's config says ${c.chunkSize} (chunkSize must match on both sides)`),
        );
      }
      raw = await this.openTarget(session, auth);
      this.session = session;
      const ready = await this.admit(session, hello, auth);
      // The consistency mode is resolved once the target exists (the first session creates it).
      this.consistency ??= await Consistency.pick(c, this.r.store.dir, raw, this.r.log);
      if (this.consistency.choice.reason) this.r.log.info({ consistency: this.consistency.choice.mode }, `consistency auto: ${this.consistency.choice.reason}`);
      target = await this.consistency.wrap(raw, this.r.store.state!.committedGeneration);
      session.ctx.volumeSize = auth.volumeSize;
      session.ctx.chunkSize = auth.chunkSize;
      session.send(ready);
      await this.exchangeHistory(session, hello);
    } catch (e) {
      await (target ?? raw)?.close();
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
    const s = this.r.store.state!;
    this.r.log.info({ peer: hello.node, committedGeneration: s.committedGeneration, applying: s.applying, sessions: this.sessions }, 'session accepted');
    const receiver = new Receiver(session, target, this.record(target), {
      chunkSize: s.chunkSize,
      checkpointBytes: c.checkpointBytes,
      checkpointInterval: c.checkpointInterval,
      what: `mirror ${this.name}`,
      log: this.r.log,
    });
    this.receiver = receiver;
    const v = target;
    this.sessionDone = receiver
      .run()
      .catch((e) => {
        const err = asTmError(e, ErrorCodes.INTERNAL, `mirror ${this.name}`);
        if (session.isOpen) session.fail(err);
        if (err.code === ErrorCodes.CONNECTION || err.code === ErrorCodes.ABORTED) {
          this.r.log.info({ code: err.code }, err.message);
          this.phase = 'waiting';
        } else {
          this.setError(err);
        }
      })
      .finally(async () => {
        this.wireBytesBase += session.counters.bytesIn;
        this.appliedBase += receiver.appliedBytes;
        this.receiver = null;
        if (this.session === session) {
          this.session = null;
          this.connectedSince = null;
        }
        await v.close().catch(() => {});
        this.refreshAllocated(true);
        if (receiver.switchoverAt !== null && !this.stopped) this.r.onSwitchover?.(receiver.switchoverAt);
      });
  }

  /**
   * Take the primary's history frame and answer with ours (and the chunks this
   * side changed as a primary, for the reverse resync). A secondary that
   * committed generations the primary never made refuses: split brain.
   */
  private async exchangeHistory(session: Session, hello: HelloMsg): Promise<void> {
    const s = this.r.store.state!;
    const m = await session.next(HANDSHAKE_TIMEOUT_MS);
    if (m.type !== 'history') throw new TmError(ErrorCodes.PROTOCOL, `expected the primary's history frame, got ${m.type}`);
    const d = s.divergence ?? null;
    const divergent = d && !d.unknown ? await loadDivergent(this.r.store.dir) : null;
    const reply: HistoryMsg = {
      type: 'history',
      role: 'secondary',
      ids: s.history ?? [],
      pending: null,
      changedBytes: d ? d.bytes : 0,
      divergent: divergent && !divergent.isEmpty ? serializeBitmap(divergent) : null,
      unknown: d?.unknown ?? false,
    };
    session.send(reply);
    const mine = s.history ?? [];
    const theirs = withPending(m.ids, m.pending);
    if (mine.length > 0 && m.ids.length > 0) {
      const cmp = compareHistories(mine, theirs);
      if (cmp.common && cmp.localAhead.length > 0) {
        const rec: SplitBrain = {
          detectedAt: Date.now(),
          peerNode: hello.node,
          common: cmp.common,
          localBytes: null,
          peerBytes: m.changedBytes,
          why: `this side committed ${cmp.localAhead.length} generation(s) the primary never made (${cmp.localAhead.map((g) => describeGen(g)).join(', ')}) after ${describeGen(cmp.common)}`,
        };
        await this.r.store.update((n) => {
          n.splitBrain = rec;
        });
        throw refuse(session, splitBrainError(this.name, rec));
      }
    }
    if (s.splitBrain) {
      await this.r.store.update((n) => {
        n.splitBrain = null;
      });
    }
  }

  /** The state file as the receiver's durable record; `target` is what the receiver writes (journaled or not). */
  private record(target: Volume): ReplicaRecord {
    const store = this.r.store;
    // The state is read anew each time: every save replaces it (save then swap).
    const state = () => store.state!;
    const consistency = this.consistency!;
    const saveApplying = (a: Applying) =>
      store.update((s) => {
        s.applying = { ...a };
        s.generation = Math.max(s.generation, a.generation);
      });
    return {
      get committedGeneration() {
        return state().committedGeneration;
      },
      get applying() {
        return state().applying;
      },
      // Both in the replica's turn: a drill never sees `applying` without its base, nor clones a target being written.
      begin: (gen, resumeFrom, info) =>
        this.exclusive(async () => {
          // The base or the journal first: a crash before `applying` is saved leaves the target untouched.
          await consistency.begin(target, gen, state().committedGeneration);
          const a = state().applying;
          // One save: the applying record, the generation's identity, and which generation covers our divergent chunks.
          await store.update((s) => {
            let changed = false;
            if (!a || a.generation !== gen) {
              s.applying = { generation: gen, cursor: resumeFrom };
              s.generation = Math.max(s.generation, gen);
              changed = true;
            }
            if (info?.gid && (s.applyingGid?.id !== info.gid.id || s.applyingGid.generation !== gen)) {
              s.applyingGid = { ...info.gid };
              changed = true;
            }
            if (info?.withPeerChanges && s.divergence && s.divergence.coveredBy !== gen) {
              s.divergence.coveredBy = gen;
              changed = true;
            }
            const viewAt = info?.viewAt ?? null;
            if ((s.applyingViewAt ?? null) !== viewAt) {
              s.applyingViewAt = viewAt;
              changed = true;
            }
            return changed;
          });
        }),
      saveApplying,
      sawUnchanged: (gen, viewAt) => {
        if (state().committedGeneration === gen) this.seenAt = { generation: gen, at: Math.max(this.seenAt?.generation === gen ? this.seenAt.at : 0, viewAt) };
      },
      saveCommitted: (gen) =>
        this.exclusive(async () => {
          // Announced (status, the next session's ready) only once durable: a failed save leaves generation gen uncommitted.
          const dropDivergent = await store.update((s) => {
            s.committedGeneration = gen;
            s.applying = null;
            s.committedAt = Date.now();
            // The replica is now the primary's view of gen (unknown when its begin did not say when that was).
            s.committedViewAt = s.applyingViewAt ?? null;
            s.applyingViewAt = null;
            if (s.applyingGid && s.applyingGid.generation === gen) s.history = appendHistory(s.history, s.applyingGid, gen === 1);
            s.applyingGid = null;
            // The chunks this side had changed as a primary are overwritten now.
            const drop = s.divergence?.coveredBy === gen;
            if (drop) s.divergence = null;
            return { drop }; // never `false`: that would skip the save
          });
          if (dropDivergent.drop) await removeDivergent(store.dir);
          this.refreshAllocated(true);
          // Only now may the base or the journal go: the commit is durable.
          await consistency.committed(target, gen);
        }),
    };
  }

  private async openTarget(session: Session, auth: AuthMsg): Promise<Volume> {
    const path = this.r.config.volume;
    let volume: Volume;
    try {
      volume = await this.r.openVolume(path, { create: { size: auth.volumeSize } });
    } catch (e) {
      throw refuse(session, asTmError(e, ErrorCodes.VOLUME_IO, `target ${path}`));
    }
    if (volume.size !== auth.volumeSize) {
      await volume.close();
      throw refuse(
        session,
        new TmError(ErrorCodes.SIZE_MISMATCH, `mirror ${this.name}: the source volume has ${auth.volumeSize} bytes but the target ${path} has ${volume.size}; nothing was written`),
      );
    }
    return volume;
  }

  /** Check the primary's identity against the state (creating it on the first session); returns the ready frame. */
  private async admit(session: Session, hello: HelloMsg, auth: AuthMsg): Promise<ReadyMsg> {
    const store = this.r.store;
    const s = store.state;
    if (s && s.volumeId === auth.volumeId && s.chunkSize !== auth.chunkSize) {
      throw refuse(session, new TmError(ErrorCodes.CHUNK_SIZE_MISMATCH, `mirror ${this.name}: the primary uses chunks of ${auth.chunkSize} bytes, the replica was built with ${s.chunkSize}`));
    }
    if (s && s.volumeId !== auth.volumeId) {
      if (!auth.fresh) {
        throw refuse(
          session,
          new TmError(
            ErrorCodes.IDENTITY_MISMATCH,
            `mirror ${this.name}: the primary's volume id ${auth.volumeId} is not ${s.volumeId}, the volume this replica holds; nothing was written (remove ${store.file} to replace the replica)`,
          ),
        );
      }
      // The primary lost its tracking state (or is new) and says so: keep the
      // replica and its generation numbers; the primary compares digests with it.
      this.r.log.warn({ was: s.volumeId, now: auth.volumeId, committedGeneration: s.committedGeneration }, 'the primary has no tracking state: adopting its volume id; it will compare digests with this replica');
      await store.update((n) => {
        n.volumeId = auth.volumeId;
        n.peerNode = hello.node;
      });
    }
    if (!s) {
      await store.set(newState('secondary', { volumeId: auth.volumeId, volumeSize: auth.volumeSize, chunkSize: auth.chunkSize, peerNode: hello.node }));
    } else if (s.peerNode !== hello.node) {
      await store.update((n) => {
        n.peerNode = hello.node;
      });
    }
    // What was saved, never more: a commit whose save failed is not announced.
    const saved = store.state!;
    return { type: 'ready', committedGeneration: saved.committedGeneration, applying: saved.applying ? { ...saved.applying } : null };
  }

  private setError(err: TmError): void {
    this.lastError = err;
    this.phase = 'error';
    this.r.log.error({ code: err.code }, err.message);
  }

  /**
   * Refresh the target's allocated bytes in the background, on a read-only
   * handle of its own (independent of sessions), at most one walk at a time,
   * and only when the figure is older than ALLOCATED_TTL_MS and
   * ALLOCATED_WALK_FACTOR times the last walk (`soon`: the target changed
   * a lot, e.g. a commit; still never more often than that factor allows).
   * Status never waits for it (issue 14 §4): the walk is sliced (Volume.allocated
   * yields), and status shows the last figure meanwhile.
   */
  private refreshAllocated(soon = false): void {
    if (this.refreshing || this.stopped) return;
    const age = Date.now() - this.allocated.at;
    const spacing = ALLOCATED_WALK_FACTOR * this.allocated.ms;
    if (age <= spacing || (!soon && age <= ALLOCATED_TTL_MS)) return;
    this.refreshing = (async () => {
      const t0 = performance.now();
      const v = await this.r.openVolume(this.r.config.volume, { readOnly: true });
      try {
        const bytes = await allocatedBytesOf(v);
        this.allocated = { at: Date.now(), bytes, ms: performance.now() - t0 };
      } finally {
        await v.close();
      }
    })()
      // Only a figure for status: a target not there yet, or a failed walk, keeps the last one.
      .catch(() => {})
      .finally(() => (this.refreshing = null));
  }

  async status(): Promise<MirrorStatus> {
    const s = this.r.store.state;
    this.refreshAllocated();
    const progress: Progress | null = this.receiver?.progress ? { ...this.receiver.progress } : null;
    return {
      name: this.name,
      role: 'secondary',
      // Inside a generation while the receiver has one open.
      state: this.phase === 'idle' && progress ? 'receiving' : this.phase,
      volume: this.r.config.volume,
      peer: s?.peerNode ?? null,
      trackingMode: null,
      chunkSize: s?.chunkSize ?? this.r.config.chunkSize,
      volumeBytes: s?.volumeSize ?? 0,
      allocatedBytes: this.allocated.bytes,
      sentBytes: 0,
      appliedBytes: this.appliedBase + (this.receiver?.appliedBytes ?? 0),
      wireBytes: this.wireBytesBase + (this.session?.counters.bytesIn ?? 0),
      dirtyBytes: 0,
      generation: s?.applying?.generation ?? s?.committedGeneration ?? 0,
      committedGeneration: s?.committedGeneration ?? 0,
      // The replica's age as the primary's clock counts (docs/metrics.md): a skew between the two hosts' clocks adds to it.
      lagSeconds: s ? lagSeconds(s, Date.now(), this.seenAt?.generation === s.committedGeneration ? this.seenAt.at : null) : null,
      progress,
      lastCycle: null,
      consistency: {
        mode: this.consistency?.choice.mode ?? null,
        reason: this.consistency?.choice.reason ?? null,
        // With a base image or a journal the committed generation can always be restored; with off only while nothing is applied.
        // A replica holding chunks it changed as a primary holds no committed generation's image.
        consistentGeneration: s && !s.divergence && (s.applying === null || (this.consistency && this.consistency.choice.mode !== 'off')) ? s.committedGeneration : null,
      },
      drills: this.drills.status(),
      ...roleStatus(s, this.r.config.name),
      error: this.lastError ? this.lastError.toJSON() : null,
      sessions: this.sessions,
      connectedSince: this.session && this.connectedSince ? this.connectedSince.toISOString() : null,
    };
  }

  /** Stop: end the session (the primary resends from the durable cursor). Idempotent. */
  async stop(abort = false): Promise<void> {
    this.stopped = true;
    // A session being accepted right now is let through its checks first, so
    // that it is closed below rather than left applying after the stop.
    await this.accepting;
    if (abort) this.session?.destroy();
    else this.session?.close();
    await this.sessionDone;
    // A walk of the map for status may be running on its own handle: let it end with the mirror.
    await this.refreshing;
    this.phase = 'stopped';
  }
}
