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
import { changeRole } from './role.js';
import { SecondaryRole } from './secondary-role.js';
import type { MirrorConfig } from './settings.js';
import { StateFile, type MirrorState, type Role } from './state.js';
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
  private state: MirrorState | null = null;
  private runner: Runner | null = null;
  private readonly log: Logger;
  /** Lifecycle and role changes, one at a time. */
  private busy: Promise<unknown> = Promise.resolve();
  private ended = false;
  private failedStart: TmError | null = null;
  /** The role that ran until stop/abort: its status (state `stopped`, final counters) is still reported. */
  private stopped: Runner | null = null;

  constructor(
    readonly config: MirrorConfig,
    private readonly ctx: MirrorContext,
  ) {
    this.stateFile = new StateFile(path.join(ctx.stateDir, config.name));
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
        if (s && s.role !== this.config.role) {
          throw new TmError(
            ErrorCodes.STATE,
            `${this.stateFile.file} belongs to a ${s.role} mirror, but the config says ${this.config.role}; the config's role only applies to a mirror without state`,
          );
        }
        this.state = s;
      } catch (e) {
        this.failedStart = asTmError(e, ErrorCodes.STATE, `mirror ${this.name}`);
        throw this.failedStart;
      }
      await this.startRunner(this.role);
    });
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
      const next = this.state ? structuredClone(this.state) : null;
      if (next) changeRole(next, to, this.stateFile.file);
      await this.runner?.stop();
      this.runner = null;
      if (next) {
        await this.stateFile.save(next);
        this.state = next;
      }
      this.log.info({ role: to, generation: next?.generation ?? 0, committedGeneration: next?.committedGeneration ?? 0 }, `role changed to ${to}`);
      await this.startRunner(to);
    });
  }

  /** An authenticated session asking for this mirror: taken while secondary, refused otherwise (with why it is not running). */
  async accept(session: Session, hello: HelloMsg, auth: AuthMsg): Promise<void> {
    if (this.role !== 'secondary') throw refuse(session, unknownMirror(this.ctx.nodeName, hello));
    const r = this.runner;
    if (!(r instanceof SecondaryRole)) throw refuse(session, this.failedStart ?? new TmError(ErrorCodes.INTERNAL, `mirror ${this.name} is not running`));
    await r.accept(session, hello, auth);
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
    if (r) return r.status();
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
    };
  }

  /** True while a role runs. */
  get running(): boolean {
    return this.runner !== null;
  }

  private async startRunner(role: Role): Promise<void> {
    try {
      await this.startRunnerNow(role);
      this.failedStart = null;
    } catch (e) {
      this.failedStart = asTmError(e, ErrorCodes.INTERNAL, `mirror ${this.name}`);
      throw this.failedStart;
    }
  }

  private async startRunnerNow(role: Role): Promise<void> {
    const r: RoleContext = { config: this.config, ctx: { ...this.ctx, connect: this.ctx.connect ?? (await this.defaultConnect(role)) }, store: this.store(), openVolume: this.ctx.openVolume ?? openVolume, log: this.log };
    const runner = role === 'primary' ? new PrimaryRole(r) : new SecondaryRole(r);
    await runner.start();
    this.runner = runner;
  }

  /** The WebSocket transport to `peer:` (TLS files read now for wss://, TM_ERR_CONFIG when unreadable). */
  private async defaultConnect(role: Role): Promise<(signal: AbortSignal) => Promise<Session>> {
    const c = this.config;
    if (role !== 'primary') return () => Promise.reject(new TmError(ErrorCodes.INTERNAL, `mirror ${c.name} is not primary`));
    const url = c.peer!;
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
        m.state = s;
        await m.stateFile.save(s);
      },
      async save() {
        if (m.state) await m.stateFile.save(m.state);
      },
      file: this.stateFile.file,
      dir: this.stateFile.dir,
    };
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
