import { randomBytes } from 'node:crypto';
import { constants as fsc, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import type { Logger } from 'pino';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { native } from '../native/index.js';
import { fsyncDir, removeDurably } from '../util/atomic.js';
import { describeUsers, fileUsers, type FileUser } from '../volume/file-users.js';
import { describeFilesystem, filesystemOf } from '../volume/filesystem.js';
import type { Consistency } from './consistency.js';
import type { StateStore } from './context.js';
import type { MirrorConfig } from './settings.js';
import { DRILL_NAME, type DrillRecord } from './state.js';
import type { DrillStatus } from './status.js';

/**
 * Failover drills (issue 11 §3, docs/drills.md): a writable clone of the
 * replica's consistent image, taken by FICLONE (metadata only) while
 * replication goes on, recorded in state.json until `drill stop` deletes it.
 */

export { DRILL_NAME };

/** TM_ERR_USAGE unless `name` is a valid drill name. */
export function checkDrillName(name: string): void {
  if (!DRILL_NAME.test(name)) {
    throw new TmError(ErrorCodes.USAGE, `drill name ${JSON.stringify(name)}: expected 1 to 64 letters, digits, ".", "_" or "-", starting with a letter or a digit`);
  }
}

/** The name of a drill started without one: `drill-<generation>-<UTC time>`, e.g. `drill-42-20250102T030405Z`. */
export function defaultDrillName(generation: number, at: Date): string {
  return `drill-${generation}-${at.toISOString().replace(/\.\d+Z$/, 'Z').replace(/[-:]/g, '')}`;
}

/** Where the clone of drill `name` of `target` goes: next to the target, `<target>.drill-<name>`. */
export function drillPath(target: string, name: string): string {
  return path.join(path.dirname(path.resolve(target)), `${path.basename(target)}.drill-${name}`);
}

/** The clone being made, before it is named, recorded and renamed into place (a crash leaves at most this; removed at start). */
function tempPath(target: string): string {
  return path.join(path.dirname(path.resolve(target)), `.${path.basename(target)}.drill-${process.pid}-${randomBytes(4).toString('hex')}.tmp`);
}

/** A drill as `drill list` and GET /drills show it. */
export interface DrillInfo extends DrillStatus {
  mirror: string;
  /** ISO time it was taken. */
  createdAt: string;
}

/** What `drill start` answers. */
export interface DrillStarted extends DrillInfo {
  /** What was cloned: the base image of the committed generation (a generation was being applied) or the target itself. */
  from: 'base' | 'target';
  /** Seconds the clone took, waiting for the receiver's turn included. */
  seconds: number;
}

/** What `drill stop` answers. */
export interface DrillStopped {
  mirror: string;
  name: string;
  path: string;
  /** False when the clone was already gone (only the record was removed). */
  deleted: boolean;
  /** With --force: who still held the clone (they keep the unlinked file until they close it). */
  users: FileUser[];
  /** Processes the daemon could not look into (no CAP_SYS_PTRACE for another user's process): one may have held the clone unseen. */
  uninspected: number;
}

/** What the drills of one mirror need from the SecondaryRole that runs them. */
export interface DrillHost {
  config: MirrorConfig;
  store: StateStore;
  log: Logger;
  /** The consistency mode of the replica (resolved now if no session has done it yet). */
  consistency(): Promise<Consistency>;
  /** Run `job` while the receiver can neither begin nor commit a generation (see {@link Drills.start}). */
  exclusive<T>(job: () => Promise<T>): Promise<T>;
}

/** The drills of one secondary mirror; one start or stop at a time. */
export class Drills {
  private turn: Promise<unknown> = Promise.resolve();

  constructor(private readonly h: DrillHost) {}

  private get mirror(): string {
    return this.h.config.name;
  }

  private get records(): DrillRecord[] {
    return this.h.store.state?.drills ?? [];
  }

  /** The drills for status, oldest first. */
  status(now = Date.now()): DrillStatus[] {
    return this.records.map((d) => ({ name: d.name, path: d.path, generation: d.generation, ageSeconds: Math.max(0, (now - d.createdAt) / 1000) }));
  }

  /** The drills for `drill list`. */
  list(now = Date.now()): DrillInfo[] {
    return this.records.map((d) => ({ mirror: this.mirror, name: d.name, path: d.path, generation: d.generation, createdAt: new Date(d.createdAt).toISOString(), ageSeconds: Math.max(0, (now - d.createdAt) / 1000) }));
  }

  /** Remove clones a crash left half made (never recorded, never renamed into place). */
  async removeStaleTemps(): Promise<void> {
    const target = path.resolve(this.h.config.volume);
    if (!(await fsp.stat(target).then((st) => st.isFile(), () => false))) return; // a device, memory:, or no target yet: no drills
    const dir = path.dirname(target);
    const re = new RegExp(`^\\.${escapeRe(path.basename(target))}\\.drill-\\d+-[0-9a-f]{8}\\.tmp$`);
    const names = await fsp.readdir(dir).catch(() => [] as string[]);
    for (const n of names) if (re.test(n)) await fsp.rm(path.join(dir, n), { force: true }).catch(() => {});
  }

  /**
   * `drill start`: clone the consistent image into `<target>.drill-<name>`.
   *
   * Atomic with respect to the receiver: the choice "base image or target"
   * and the FICLONE happen in {@link DrillHost.exclusive}, which
   * ReplicaRecord.begin and saveCommitted also take. Inside it, with the
   * state read there: `applying === null` means the target holds the
   * committed generation and no write can come before the next begin (which
   * waits); `applying !== null` means the base of the committed generation
   * exists whole (begin makes it before recording `applying`) and stays until
   * saveCommitted (which waits), and nothing ever writes it.
   *
   * Durability: the clone is made under a temp name and fsynced, then
   * named (a default name holds the generation taken), recorded in
   * state.json, then renamed into place. A crash leaves a temp
   * file (removed at start) or a record whose file is missing (`drill stop`
   * removes the record).
   */
  start(requested?: string): Promise<DrillStarted> {
    return this.serial(async () => {
      const t0 = performance.now();
      const s = this.h.store.state;
      if (!s || s.committedGeneration === 0) {
        throw new TmError(ErrorCodes.STATE, `mirror ${this.mirror}: no generation is committed on this replica yet (the initial sync has not completed): there is no consistent image to drill on`);
      }
      if (requested !== undefined) checkDrillName(requested);
      const consistency = await this.h.consistency().catch((e: unknown) => {
        const err = asTmError(e, ErrorCodes.CONSISTENCY, `mirror ${this.mirror}`);
        throw err.code === ErrorCodes.CONSISTENCY ? new TmError(ErrorCodes.DRILL_UNSUPPORTED, `mirror ${this.mirror}: drill start: ${err.message}`) : err;
      });
      if (consistency.choice.mode !== 'reflink') throw await this.unsupported(consistency);
      const at = new Date();
      const target = path.resolve(this.h.config.volume);
      // A name asked for is checked before the clone (cheap refusal), a default one (it names the generation taken) after.
      if (requested !== undefined) await this.checkFree(target, requested);
      const tmp = tempPath(target);
      let name = requested ?? '';
      let file = '';
      let taken: { generation: number; from: 'base' | 'target' };
      // Where the time goes (logged): waiting for the receiver's turn, the FICLONE, the fsync, the record and rename.
      const ms = { wait: 0, clone: 0, sync: 0, record: 0 };
      let t = performance.now();
      const lap = (k: keyof typeof ms) => {
        const now = performance.now();
        ms[k] = Math.round(now - t);
        t = now;
      };
      try {
        taken = await this.h.exclusive(async () => {
          lap('wait');
          const st = this.h.store.state!;
          const generation = st.committedGeneration;
          let src = target;
          if (st.applying !== null) {
            const base = await consistency.baseImage(generation);
            if (!base) {
              throw new TmError(
                ErrorCodes.CONSISTENCY,
                `mirror ${this.mirror}: generation ${st.applying.generation} is being applied and the base image of generation ${generation} is missing: there is no consistent image to clone`,
              );
            }
            src = base;
          }
          await ficloneInto(src, tmp);
          lap('clone');
          return { generation, from: src === target ? ('target' as const) : ('base' as const) };
        });
        name = requested ?? defaultDrillName(taken.generation, at);
        file = drillPath(target, name);
        if (requested === undefined) await this.checkFree(target, name);
        // The clone is whole and its data fixed; make it durable, record it, then show it under its name.
        const fh = await fsp.open(tmp, fsc.O_RDONLY);
        try {
          await fh.sync();
        } finally {
          await fh.close();
        }
        lap('sync');
        const rec: DrillRecord = { name, path: file, generation: taken.generation, createdAt: at.getTime() };
        // Recorded first (a failed save leaves no record and no clone), then shown under its name.
        await this.h.store.update((s) => {
          s.drills = [...(s.drills ?? []), rec];
        });
        try {
          await fsp.rename(tmp, file);
          await fsyncDir(path.dirname(file));
          lap('record');
        } catch (e) {
          await this.h.store
            .update((s) => {
              s.drills = (s.drills ?? []).filter((d) => d.name !== rec.name);
            })
            .catch(() => {});
          throw e;
        }
      } catch (e) {
        await fsp.rm(tmp, { force: true }).catch(() => {});
        throw asTmError(e, ErrorCodes.VOLUME_IO, `mirror ${this.mirror}: drill ${name || '(default name)'}`);
      }
      const seconds = (performance.now() - t0) / 1000;
      this.h.log.info({ drill: name, path: file, generation: taken.generation, from: taken.from, seconds, ms }, 'drill started');
      return { mirror: this.mirror, name, path: file, generation: taken.generation, createdAt: at.toISOString(), ageSeconds: 0, from: taken.from, seconds };
    });
  }

  /** `drill stop`: delete the clone and its record; TM_ERR_DRILL_BUSY while something holds the clone, unless `force`. */
  stop(name: string, force = false): Promise<DrillStopped> {
    return this.serial(async () => {
      const rec = this.records.find((d) => d.name === name);
      if (!rec) {
        const names = this.records.map((d) => d.name);
        throw new TmError(ErrorCodes.DRILL_UNKNOWN, `mirror ${this.mirror} has no drill named ${JSON.stringify(name)} (it has ${names.length ? names.join(', ') : 'none'})`);
      }
      const present = await exists(rec.path);
      const { users, uninspected } = present ? await fileUsers(rec.path) : { users: [], uninspected: 0 };
      if (users.length > 0 && !force) {
        throw new TmError(
          ErrorCodes.DRILL_BUSY,
          `mirror ${this.mirror}: drill ${name} is in use: ${rec.path} is held by ${describeUsers(users)}; unmount it, detach the loop device (losetup -d) and stop what holds it, or use --force`,
        );
      }
      if (present) await removeDurably(rec.path);
      await this.h.store.update((s) => {
        s.drills = (s.drills ?? []).filter((d) => d.name !== rec.name);
      });
      this.h.log.info({ drill: name, path: rec.path, deleted: present, forced: users.length > 0, uninspected }, users.length > 0 ? `drill stopped by force while held by ${describeUsers(users)}` : 'drill stopped');
      if (uninspected > 0) this.h.log.warn({ drill: name, uninspected }, `${uninspected} processes could not be checked for ${rec.path} (another user's, and no CAP_SYS_PTRACE)`);
      return { mirror: this.mirror, name, path: rec.path, deleted: present, users, uninspected };
    });
  }

  /** TM_ERR_DRILL_EXISTS when drill `name` is recorded, or a file has its clone's name. */
  private async checkFree(target: string, name: string): Promise<void> {
    const file = drillPath(target, name);
    if (this.records.some((d) => d.name === name)) throw new TmError(ErrorCodes.DRILL_EXISTS, `mirror ${this.mirror}: a drill named ${name} exists (${file}); stop it or choose another name`);
    if (await exists(file)) {
      throw new TmError(ErrorCodes.DRILL_EXISTS, `mirror ${this.mirror}: ${file} exists and is not a recorded drill (left by a crash?); remove it or choose another drill name`);
    }
  }

  /** TM_ERR_DRILL_UNSUPPORTED naming the target's filesystem and what drills need. */
  private async unsupported(c: Consistency): Promise<TmError> {
    const target = path.resolve(this.h.config.volume);
    const need = 'drills need the target on XFS with reflink=1 or on btrfs (consistency: auto or reflink); drills on other filesystems, exported over NBD, are not there yet';
    if (c.choice.mode === 'off') {
      return new TmError(ErrorCodes.DRILL_UNSUPPORTED, `mirror ${this.mirror}: consistency: off keeps no consistent image to clone while a generation is applied; ${need}`);
    }
    const st = await fsp.stat(target).catch(() => null);
    if (st && !st.isFile()) return new TmError(ErrorCodes.DRILL_UNSUPPORTED, `mirror ${this.mirror}: the target ${target} is not a regular file, so it cannot be cloned; ${need}`);
    const fs = describeFilesystem(await filesystemOf(target));
    // auto fell back to the journal because FICLONE failed (its reason says where and how), or the config asked for the journal.
    const why = c.choice.reason ? `which has no reflink: ${c.choice.reason.replace(/; using the undo journal$/, '')}` : 'and the mirror runs consistency: journal, which keeps no image to clone';
    return new TmError(ErrorCodes.DRILL_UNSUPPORTED, `mirror ${this.mirror}: drill start: the target ${target} is on ${fs}, ${why}; ${need}`);
  }

  private serial<T>(job: () => Promise<T>): Promise<T> {
    const run = this.turn.then(job);
    this.turn = run.catch(() => {});
    return run;
  }
}

/** FICLONE all of `from` into the new file `to` (O_EXCL, mode 0600). */
async function ficloneInto(from: string, to: string): Promise<void> {
  let src: fsp.FileHandle | undefined;
  let dst: fsp.FileHandle | undefined;
  try {
    src = await fsp.open(from, fsc.O_RDONLY);
    dst = await fsp.open(to, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL, 0o600);
    await native().ficlone(dst.fd, src.fd);
  } catch (e) {
    throw asTmError(e, ErrorCodes.VOLUME_IO, `cloning ${from} to ${to} (FICLONE)`);
  } finally {
    await src?.close().catch(() => {});
    await dst?.close().catch(() => {});
  }
}

async function exists(file: string): Promise<boolean> {
  try {
    await fsp.lstat(file);
    return true;
  } catch {
    return false;
  }
}

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
