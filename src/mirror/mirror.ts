import * as path from 'node:path';
import type { Logger } from 'pino';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { LogLimiter } from '../util/log-limit.js';
import { openVolume } from '../volume/factory.js';
import { refuse, secondaryHandshake } from '../wire/handshake.js';
import type { AuthMsg, HelloMsg } from '../wire/messages.js';
import type { Session } from '../wire/session.js';
import { connect } from '../wire/transport.js';
import { readTlsFiles } from '../wire/tls.js';
import type { MirrorContext, RoleContext, StateStore } from './context.js';
import type { Drills } from './drill.js';
import { PrimaryRole } from './primary-role.js';
import { consistencyDir, rollbackTarget, undoLeft } from './consistency.js';
import { removeDivergent, saveDivergent } from './divergence.js';
import * as gens from './generations.js';
import { describeGen, sameGen } from './history.js';
import { changeRole } from './role.js';
import { SecondaryRole } from './secondary-role.js';
import type { MirrorConfig } from './settings.js';
import { freezeState, StateFile, type MirrorState, type Role } from './state.js';
import { blankStatus, type MirrorStatus } from './status.js';

type Runner = PrimaryRole | SecondaryRole;

/**
 * One configured mirror. Owns its state file (`stateDir/<name>/state.json`),
 * its lifecycle and its role: it runs a {@link PrimaryRole} (which sends
 * generations with a Sender) while primary and a {@link SecondaryRole} (which
 * applies them with a Receiver) while secondary, and changes from one to the
 * other with {@link Mirror.changeRole}. The daemon hands it authenticated
 * sessions ({@link Mirror.accept}) and asks it for status.
 */
export class Mirror {
  private readonly stateFile: StateFile;
  /** As last saved (never ahead of state.json), frozen; replaced whole by each save. */
  private state: Readonly<MirrorState> | null = null;
  /** Saves of the state through the store, one at a time. */
  private saving: Promise<unknown> = Promise.resolve();
  private runner: Runner | null = null;
  private readonly log: Logger;
  /** Lifecycle and role changes, one at a time. */
  private busy: Promise<unknown> = Promise.resolve();
  private ended = false;
  private failedStart: TmError | null = null;
  /** The role that ran until stop/abort: its status (state `stopped`, final counters) is still reported. */
  private stopped: Runner | null = null;
  private roleConflict: string | null = null;

  constructor(
    readonly config: MirrorConfig,
    private readonly ctx: MirrorContext,
  ) {
    this.stateFile = new StateFile(path.join(ctx.stateDir, config.name), ctx.writeState);
    this.log = ctx.log;
  }

  get name(): string {
    return this.config.name;
  }

  /** The role the mirror runs now (the state's, or the config's before there is a state). */
  get role(): Role {
    return this.state?.role ?? this.config.role;
  }

  /** Load (and migrate) the state, then start the role it names. */
  start(): Promise<void> {
    return this.serial(async () => {
      try {
        await this.stateFile.init();
        const loaded = await this.stateFile.load();
        if (loaded?.migrated) this.log.info({ file: this.stateFile.file, role: loaded.state.role }, 'state file migrated from format 1 to format 2');
        const s = loaded?.state ?? null;
        this.state = s && freezeState(s);
        this.noteRoleConflict();
      } catch (e) {
        this.failedStart = asTmError(e, ErrorCodes.STATE, `mirror ${this.name}`);
        throw this.failedStart;
      }
      await this.startRunner(this.role);
    });
  }

  /** The config's role is only the initial one: a state that says otherwise (promote/demote) wins, and status and the log say so. */
  private noteRoleConflict(): void {
    const s = this.state;
    if (s && s.role !== this.config.role) {
      this.roleConflict = `the config says role ${this.config.role}, but the mirror is ${s.role} (changed by promote/demote, recorded in ${this.stateFile.file}); the recorded role runs, the config's applies only to a mirror without state`;
      this.log.warn({ configRole: this.config.role, role: s.role }, this.roleConflict);
    } else {
      this.roleConflict = null;
    }
  }

  /** Stop (sessions closed, state and tracking state persisted). Idempotent. */
  stop(): Promise<void> {
    return this.end(false);
  }

  /** Stop at once: sessions are dropped without a close handshake; state is still persisted. Idempotent. */
  abort(): Promise<void> {
    return this.end(true);
  }

  private end(abort: boolean): Promise<void> {
    this.ended = true;
    return this.serial(async () => {
      const r = this.runner;
      this.runner = null;
      await r?.stop(abort);
      this.stopped = r;
    });
  }

  /**
   * Change the role while the daemon runs: stop the running role, change the
   * state's role (see role.ts for what each direction keeps and requires) and
   * save it, then start the other role. On a refusal nothing changes and the
   * old role keeps running.
   */
  changeRole(to: Role): Promise<void> {
    return this.serial(async () => {
      if (this.ended) throw new TmError(ErrorCodes.ABORTED, `mirror ${this.name} is stopped`);
      if (this.role === to) return;
      if (to === 'primary' && !this.config.peer && !this.ctx.connect) {
        throw new TmError(ErrorCodes.CONFIG, `mirror ${this.name}: cannot become primary without a peer URL (peer:) in its config`);
      }
      const next = this.state ? (structuredClone(this.state) as MirrorState) : null;
      if (next) changeRole(next, to, this.stateFile.file);
      await this.runner?.stop();
      this.runner = null;
      if (next) await this.saveThenSwap(() => next);
      this.log.info({ role: to, generation: next?.generation ?? 0, committedGeneration: next?.committedGeneration ?? 0 }, `role changed to ${to}`);
      await this.startRunner(to);
    });
  }

  /** A secondary agreed to a switchover and its session ended: promote it (in the background of the receiver). */
  private onSwitchover = (gen: number): void => {
    void this.promote({ force: true, why: `switchover at generation ${gen}` }).catch((e) => this.log.error({ err: e }, 'promote after switchover failed'));
  };

  /** An authenticated session asking for this mirror: taken while secondary, refused otherwise (with why it is not running). */
  async accept(session: Session, hello: HelloMsg, auth: AuthMsg): Promise<void> {
    const r = this.runner;
    if (this.role === 'primary' && r instanceof PrimaryRole) {
      // Another side believes it is primary too: say so to both (split brain), write nothing.
      try {
        await r.refuseAsPrimary(session, auth.volumeId, hello.node);
      } catch (e) {
        throw refuse(session, asTmError(e, ErrorCodes.SPLIT_BRAIN, `mirror ${this.name}`));
      }
    }
    if (this.role !== 'secondary') throw refuse(session, unknownMirror(this.ctx.nodeName, hello));
    if (!(r instanceof SecondaryRole)) throw refuse(session, this.failedStart ?? new TmError(ErrorCodes.CONNECTION, `mirror ${this.name} is not running yet on ${this.ctx.nodeName} (starting or changing role); retry`));
    await r.accept(session, hello, auth);
  }

  // ---- issue 12: promote, demote, switchover, resolve (docs/runbook.md) ----

  /**
   * `thinmirror promote`: this secondary becomes the primary. Stops receiving
   * (refused while a primary is connected, unless `force`), rolls the replica
   * back to its last committed generation, records the primary role with the
   * history continuing from that generation, and takes the volume as the
   * change source's base.
   */
  promote(o: { force?: boolean; why?: string } = {}): Promise<RoleChangeReport> {
    return this.serial(async () => {
      const t0 = Date.now();
      if (this.ended) throw new TmError(ErrorCodes.ABORTED, `mirror ${this.name} is stopped`);
      if (this.role === 'primary') throw new TmError(ErrorCodes.ROLE, `mirror ${this.name} is already primary on ${this.ctx.nodeName}`);
      const r = this.runner;
      if (r instanceof SecondaryRole && r.peerConnected && !o.force) {
        throw new TmError(
          ErrorCodes.PEER_CONNECTED,
          `mirror ${this.name}: primary ${this.state?.peerNode ?? 'the peer'} is connected and replicating to this side; stop it or demote it first, or promote --force (the old primary is then refused as a split brain when it connects)`,
        );
      }
      if (!this.state) throw new TmError(ErrorCodes.STATE, `mirror ${this.name}: this side never received a generation (no ${this.stateFile.file}): there is nothing to promote`);
      await r?.stop(true);
      this.runner = null;
      // Read after the stop: the receiver's last checkpoint may have changed it.
      const s = this.state;
      const undone = s.applying?.generation ?? null;
      try {
        await rollbackForPromote(this.config, this.stateFile, s, this.log, (next) => this.saveThenSwap(() => next));
        const next = structuredClone(this.state!) as MirrorState;
        changeRole(next, 'primary', this.stateFile.file);
        await this.saveThenSwap(() => next);
      } catch (e) {
        // Refused or failed before the role changed: the secondary goes on receiving.
        if (this.role === 'secondary' && !this.runner) await this.startRunner('secondary').catch(() => {});
        throw e;
      }
      this.noteRoleConflict();
      this.log.info({ generation: this.state!.committedGeneration, undone, why: o.why ?? 'promote' }, 'promoted: this side is primary');
      await this.startRunner('primary', { rebase: true });
      return this.report('primary', t0, undone, null, this.promoteWarnings());
    });
  }

  /**
   * `thinmirror demote`: this primary becomes a secondary. The chunks it
   * changed that the other side never committed (pending generations, its own
   * divergent chunks, and what changed since the last cycle) are kept on disk
   * for the reverse resync; tracking state goes.
   */
  demote(why = 'demoted'): Promise<RoleChangeReport> {
    return this.serial(() => this.demoteNow(Date.now(), why, null));
  }

  private async demoteNow(t0: number, why: string, afterSwitchover: number | null): Promise<RoleChangeReport> {
    if (this.ended) throw new TmError(ErrorCodes.ABORTED, `mirror ${this.name} is stopped`);
    if (this.role === 'secondary') throw new TmError(ErrorCodes.ROLE, `mirror ${this.name} is already secondary on ${this.ctx.nodeName}`);
    const r = this.runner;
    if (!(r instanceof PrimaryRole) || !this.state) {
      throw new TmError(ErrorCodes.STATE, `mirror ${this.name} is not running${this.failedStart ? ` (${this.failedStart.code}: ${this.failedStart.message})` : ''}: its changes cannot be found to keep them; fix that first`);
    }
    // A switchover's session stays open until this side is recorded secondary: the
    // peer promotes itself when it closes, and must never find this side still primary.
    const switching = afterSwitchover !== null;
    if (!switching) await r.halt();
    let changed: Awaited<ReturnType<PrimaryRole['changedSinceCommitted']>>;
    let next: MirrorState;
    let bytes: number;
    try {
      changed = await r.changedSinceCommitted();
      next = structuredClone(this.state) as MirrorState;
      bytes = changed ? gens.bitmapBytes(changed, next.chunkSize, next.volumeSize) : 0;
      if (changed && !changed.isEmpty) await saveDivergent(this.stateFile.dir, changed);
      next.divergence =
        changed === null
          ? { since: next.history?.at(-1) ?? null, bytes: 0, unknown: true, reason: `${why}: the change source lost its base, the changed chunks are not known`, coveredBy: null }
          : changed.isEmpty
            ? null
            : { since: next.history?.at(-1) ?? null, bytes, unknown: false, reason: why, coveredBy: null };
      changeRole(next, 'secondary', this.stateFile.file);
      const n = next;
      await this.saveThenSwap(() => n);
    } catch (e) {
      // Not demoted: the primary role starts again (a peer that agreed to a switchover then meets a primary: a split brain, refused by both).
      await r.stop().catch(() => {});
      this.runner = null;
      await this.startRunner('primary').catch(() => {});
      throw e;
    }
    if (switching) await r.halt();
    this.noteRoleConflict();
    if (!next.divergence) await removeDivergent(this.stateFile.dir);
    await r.dropTracking().catch((e) => this.log.warn({ err: e }, 'removing tracking state after demote failed'));
    await r.stop();
    this.runner = null;
    this.log.info({ committedGeneration: next.committedGeneration, divergentBytes: bytes, unknown: changed === null, why }, 'demoted: this side is secondary');
    await this.startRunner('secondary');
    const warnings = this.ctx.listening === false ? [`this node has no listen: address, so no primary can connect to it; add listen: { host, port } to the config and restart the daemon`] : [];
    if (afterSwitchover === null && changed && !changed.isEmpty) warnings.push(`${bytes} bytes changed here that the peer never committed: they are overwritten by the peer's data at the next resync`);
    return this.report('secondary', t0, null, changed === null ? null : bytes, warnings);
  }

  /**
   * `thinmirror switchover` on the primary: a planned swap with both sides up.
   * The last generation is committed, no new one is made, the secondary agrees
   * to take over at it, this side is recorded secondary, then the session
   * closes and the peer promotes itself.
   */
  switchover(timeoutMs = 300_000): Promise<RoleChangeReport> {
    return this.serial(async () => {
      const t0 = Date.now();
      if (this.role !== 'primary') throw new TmError(ErrorCodes.ROLE, `mirror ${this.name} is secondary on ${this.ctx.nodeName}: run switchover on the primary's host`);
      const r = this.runner;
      if (!(r instanceof PrimaryRole)) throw new TmError(ErrorCodes.STATE, `mirror ${this.name} is not running`);
      const gen = await r.switchover(timeoutMs);
      return this.demoteNow(t0, `switchover at generation ${gen}`, gen);
    });
  }

  /**
   * `thinmirror resolve --discard-local`: end a split brain by throwing away
   * this side's changes since the common generation. A primary is demoted
   * (its changed chunks are overwritten by the peer's); a secondary that
   * committed generations the primary never made forgets them, and the
   * primary compares digests with it (its changed chunks are not known).
   */
  resolve(o: { discardLocal: boolean }): Promise<RoleChangeReport> {
    if (!o.discardLocal) return Promise.reject(new TmError(ErrorCodes.USAGE, 'resolve: --discard-local is required (it names the side whose changes are thrown away)'));
    const sb = this.state?.splitBrain;
    if (!sb) return Promise.reject(new TmError(ErrorCodes.ROLE, `mirror ${this.name}: no split brain is recorded on ${this.ctx.nodeName}; to hand over the primary role use demote/promote or switchover`));
    if (this.role === 'primary') return this.demote(`split brain with ${sb.peerNode} resolved by discarding this side's changes since ${describeGen(sb.common)}`);
    return this.serial(async () => {
      const t0 = Date.now();
      const next = structuredClone(this.state!) as MirrorState;
      const hist = next.history ?? [];
      const keep = sb.common ? hist.findIndex((g) => sameGen(g, sb.common)) + 1 : 0;
      next.history = hist.slice(0, keep);
      next.committedGeneration = sb.common?.generation ?? 0;
      next.generation = Math.max(next.committedGeneration, next.applying?.generation ?? 0);
      next.divergence = { since: sb.common, bytes: 0, unknown: true, reason: `split brain with ${sb.peerNode} resolved by discarding this side's generations after ${describeGen(sb.common)}`, coveredBy: null };
      next.splitBrain = null;
      await this.saveThenSwap(() => next);
      this.log.warn({ common: sb.common }, 'split brain resolved: this side\'s generations after the common one are discarded; the primary compares digests');
      return this.report('secondary', t0, null, null, []);
    });
  }

  private promoteWarnings(): string[] {
    const w: string[] = [];
    if (!this.config.peer && !this.ctx.connect) {
      w.push(`mirror ${this.name} has no peer: URL in ${this.ctx.nodeName}'s config, so replication to the other side cannot run: add peer: ws://HOST:PORT (the other host's listen address) to this mirror and reload`);
    }
    return w;
  }

  private report(role: Role, t0: number, undone: number | null, divergentBytes: number | null, warnings: string[]): RoleChangeReport {
    return { mirror: this.name, role, committedGeneration: this.state?.committedGeneration ?? 0, undone, divergentBytes, seconds: (Date.now() - t0) / 1000, warnings };
  }

  /** The drills of this mirror (docs/drills.md): a running secondary's; TM_ERR_UNKNOWN_MIRROR on a primary, TM_ERR_STATE while not running. */
  drills(): Drills {
    if (this.runner instanceof SecondaryRole) return this.runner.drills;
    if (this.role !== 'secondary') throw new TmError(ErrorCodes.UNKNOWN_MIRROR, `mirror ${this.name} is primary on this node: drills are taken on the secondary's host`);
    throw new TmError(ErrorCodes.STATE, `mirror ${this.name} is not running${this.failedStart ? ` (${this.failedStart.code}: ${this.failedStart.message})` : ''}`);
  }

  /** Why the role could not start (the last attempt), or null. */
  get startError(): TmError | null {
    return this.failedStart;
  }

  async status(): Promise<MirrorStatus> {
    const r = this.runner ?? (this.failedStart ? null : this.stopped);
    if (r) return { ...(await r.status()), roleConflict: this.roleConflict };
    const c = this.config;
    // Not running: it could not start (or was stopped); nothing measured to report.
    return {
      ...blankStatus({
        name: c.name,
        role: this.role,
        state: this.failedStart ? 'error' : 'stopped',
        volume: c.volume,
        peer: c.peer ?? null,
        trackingMode: this.role === 'primary' ? c.tracking.mode : null,
        chunkSize: c.chunkSize,
      }),
      error: this.failedStart ? this.failedStart.toJSON() : null,
      roleConflict: this.roleConflict,
    };
  }

  /** True while a role runs. */
  get running(): boolean {
    return this.runner !== null;
  }

  private async startRunner(role: Role, o: { rebase?: boolean } = {}): Promise<void> {
    try {
      await this.startRunnerNow(role, o);
      this.failedStart = null;
    } catch (e) {
      this.failedStart = asTmError(e, ErrorCodes.INTERNAL, `mirror ${this.name}`);
      throw this.failedStart;
    }
  }

  private async startRunnerNow(role: Role, o: { rebase?: boolean }): Promise<void> {
    const r: RoleContext = {
      config: this.config,
      ctx: { ...this.ctx, connect: this.ctx.connect ?? (await this.defaultConnect(role)) },
      store: this.store(),
      openVolume: this.ctx.openVolume ?? openVolume,
      log: this.log,
      onSwitchover: this.onSwitchover,
    };
    const runner = role === 'primary' ? new PrimaryRole(r) : new SecondaryRole(r);
    // Only right after a promote: after a crash in between, the volume may have been written since, and digests are compared instead.
    if (runner instanceof PrimaryRole && o.rebase) runner.rebaseAtStart = true;
    await runner.start();
    this.runner = runner;
  }

  /** The WebSocket transport to `peer:` (TLS files read now for wss://, TM_ERR_CONFIG when unreadable). */
  private async defaultConnect(role: Role): Promise<(signal: AbortSignal) => Promise<Session>> {
    const c = this.config;
    if (role !== 'primary') return () => Promise.reject(new TmError(ErrorCodes.INTERNAL, `mirror ${c.name} is not primary`));
    if (!c.peer) return () => Promise.reject(new TmError(ErrorCodes.CONFIG, `mirror ${c.name} is primary but has no peer: URL in the config: add peer: ws://HOST:PORT (the other host's listen address) and reload`));
    const url = c.peer;
    const files = c.tls;
    const tls = files ? await readTlsFiles(files, files.origin === 'node' ? 'tls' : `mirror ${c.name}: tls`, { log: this.log, refusedBy: 'the secondary' }) : null;
    return (signal) => connect(url, { tls: url.startsWith('wss://') ? tls : null, signal });
  }

  private store(): StateStore {
    const m = this;
    return {
      get state() {
        return m.state;
      },
      async set(s) {
        await m.saveThenSwap(() => s);
      },
      update<T>(change: (s: MirrorState) => T): Promise<T> {
        let result!: T;
        return m
          .saveThenSwap((current) => {
            if (!current) throw new TmError(ErrorCodes.INTERNAL, `mirror ${m.name}: no state to change yet`);
            const next = structuredClone(current) as MirrorState;
            result = change(next);
            return result === false ? null : next;
          })
          .then(() => result);
      },
      file: this.stateFile.file,
      dir: this.stateFile.dir,
    };
  }

  /**
   * Save then swap, one at a time: `make` builds the next state from the
   * current one when its turn comes (null: nothing to save); it is saved, and
   * only once the save succeeded does it become the state. A failed save
   * rejects and leaves the state as it was.
   */
  private saveThenSwap(make: (current: Readonly<MirrorState> | null) => MirrorState | null): Promise<void> {
    const run = this.saving.then(async () => {
      const next = make(this.state);
      if (next === null) return;
      await this.stateFile.save(next);
      this.state = freezeState(next);
    });
    this.saving = run.catch(() => {});
    return run;
  }

  private serial<T>(job: () => Promise<T>): Promise<T> {
    const run = this.busy.then(job);
    this.busy = run.catch(() => {});
    return run;
  }
}

/** One limiter of "session refused" lines before authentication per logger (per daemon). */
const preauthRefusals = new WeakMap<Logger, LogLimiter>();

/**
 * Serve a session a primary opened to this node: the secondary's half of the
 * handshake, then the mirror it names takes it (or it is refused with a coded
 * error the peer is told). Never rejects; a refusal is logged once. Refusals of
 * peers that never proved the key are logged at most once per 5 s (the line
 * counts the others): anyone who can connect can make them.
 */
export async function serveSession(session: Session, o: { node: string; psk: Buffer; log: Logger; mirror: (name: string) => Mirror | undefined }): Promise<void> {
  try {
    const { hello, auth } = await secondaryHandshake(session, { node: o.node, psk: o.psk });
    const m = o.mirror(hello.mirror);
    if (!m) throw refuse(session, unknownMirror(o.node, hello));
    await m.accept(session, hello, auth);
  } catch (err) {
    const te = asTmError(err, ErrorCodes.PROTOCOL, session.peerName);
    if (session.isOpen) session.fail(te);
    if (session.authenticated) return void o.log.warn({ code: te.code, peer: session.peerName }, `session refused: ${te.message}`);
    let limiter = preauthRefusals.get(o.log);
    if (!limiter) preauthRefusals.set(o.log, (limiter = new LogLimiter()));
    const turn = limiter.take();
    if (!turn) return;
    const more = turn.unlogged ? ` (and ${turn.unlogged} more sessions refused before authentication since the last such line)` : '';
    o.log.warn({ code: te.code, peer: session.peerName, refusedUnlogged: turn.unlogged }, `session refused: ${te.message}${more}`);
  }
}

/** The refusal of a session for a mirror this node does not hold as secondary. */
function unknownMirror(node: string, hello: HelloMsg): TmError {
  return new TmError(ErrorCodes.UNKNOWN_MIRROR, `node ${node} holds no secondary mirror named "${hello.mirror}" (asked by ${hello.node})`);
}

/** What promote, demote, switchover and resolve did (the control socket's answer). */
export interface RoleChangeReport {
  mirror: string;
  /** The role now. */
  role: Role;
  committedGeneration: number;
  /** promote: the generation partly applied that was rolled back, or null. */
  undone: number | null;
  /** demote/switchover: bytes changed here that the peer never committed (kept for the reverse resync); null when not known. */
  divergentBytes: number | null;
  seconds: number;
  /** What is missing for replication to run the other way, and other things the operator must know. */
  warnings: string[];
}

/**
 * Before a secondary becomes primary: the target back to the image of the
 * last committed generation (issue 11's base image or undo journal), with
 * `applying: null` recorded first, as `thinmirror rollback` does.
 */
async function rollbackForPromote(c: MirrorConfig, file: StateFile, s: Readonly<MirrorState>, log: Logger, save: (next: MirrorState) => Promise<void>): Promise<void> {
  let target;
  try {
    target = await openVolume(c.volume, {});
  } catch (e) {
    if (s.applying === null) return; // no target at all: nothing was ever applied
    throw asTmError(e, ErrorCodes.VOLUME_IO, `mirror ${c.name}: opening ${c.volume} to roll it back`);
  }
  try {
    if (s.applying !== null) {
      if ((await undoLeft(c, file.dir, target.kind === 'file')) === null) {
        throw new TmError(
          ErrorCodes.CONSISTENCY,
          `mirror ${c.name}: generation ${s.applying.generation} is partly applied and there is no base image or undo journal (consistency: ${c.consistency}) to bring back generation ${s.committedGeneration}: this replica is not a consistent image and cannot be promoted`,
        );
      }
      await save({ ...structuredClone(s as MirrorState), applying: null, applyingGid: null, applyingViewAt: null, generation: s.committedGeneration });
    }
    const r = await rollbackTarget(c, file.dir, target, s.committedGeneration, log);
    if (r.generation !== null) log.warn({ undone: r.generation, mode: r.mode, bytes: r.bytes, dir: consistencyDir(c, file.dir, target.kind === 'file') }, 'rolled back to the last committed generation before promoting');
    await target.flush();
  } finally {
    await target.close();
  }
}
