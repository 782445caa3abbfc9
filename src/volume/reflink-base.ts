import { constants as fsc, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { native } from '../native/index.js';
import { fsyncDir, removeDurably } from '../util/atomic.js';

/**
 * Consistency mode `reflink` (issue 11 §1): before the first write of
 * generation N, the target file is cloned (FICLONE: metadata only, the data
 * blocks are shared) into `base-<N-1>.img` in the consistency directory, on
 * the target's filesystem. The base is the image of the last committed
 * generation; it is kept until COMMIT(N) is durable, then deleted. Rollback
 * clones the base back over the target.
 *
 * A base becomes visible under its final name only once complete and durable
 * (cloned into a temp name, fsynced, renamed, directory fsynced), so a base
 * that exists is always whole. A base older than the committed generation is
 * stale (a crash between recording the commit and deleting it) and is removed.
 */
export class ReflinkBase {
  constructor(
    /** The target file (a regular file on a filesystem with reflink). */
    readonly target: string,
    /** The consistency directory, on the target's filesystem. */
    readonly dir: string,
  ) {}

  /** Whether FICLONE works from `target` into `dir` (same filesystem, reflink supported), and why not. */
  static async usable(target: string, dir: string): Promise<{ ok: true } | { ok: false; reason: string }> {
    let ts;
    try {
      ts = await fsp.stat(target);
    } catch (e) {
      return { ok: false, reason: `${target}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}` };
    }
    if (!ts.isFile()) return { ok: false, reason: `${target} is not a regular file` };
    await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
    const ds = await fsp.stat(dir);
    if (ts.dev !== ds.dev) return { ok: false, reason: `${dir} is not on the filesystem of ${target}` };
    const a = path.join(dir, '.reflink-probe-a');
    const b = path.join(dir, '.reflink-probe-b');
    let fa: fsp.FileHandle | undefined;
    let fb: fsp.FileHandle | undefined;
    try {
      fa = await fsp.open(a, 'w+', 0o600);
      await fa.write(Buffer.alloc(4096, 1), 0, 4096, 0);
      fb = await fsp.open(b, 'w+', 0o600);
      await native().ficlone(fb.fd, fa.fd);
      return { ok: true };
    } catch (e) {
      return { ok: false, reason: `FICLONE is not supported in ${dir} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})` };
    } finally {
      await fa?.close().catch(() => {});
      await fb?.close().catch(() => {});
      await fsp.rm(a, { force: true });
      await fsp.rm(b, { force: true });
    }
  }

  /** The base image of `generation`. */
  file(generation: number): string {
    return path.join(this.dir, `base-${generation}.img`);
  }

  /** The complete bases present, oldest first. */
  async list(): Promise<{ generation: number; file: string }[]> {
    let names: string[];
    try {
      names = await fsp.readdir(this.dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw asTmError(e, ErrorCodes.VOLUME_IO, `reading ${this.dir}`);
    }
    return names
      .map((n) => /^base-(\d+)\.img$/.exec(n))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => ({ generation: Number(m[1]), file: path.join(this.dir, m[0]) }))
      .sort((x, y) => x.generation - y.generation);
  }

  /**
   * Make sure the base of `committed` exists before a generation above it is
   * written (a no-op when it does: a resumed generation keeps its base, the
   * target is already partly written). Stale bases go.
   */
  async ensure(committed: number): Promise<{ file: string; cloned: boolean }> {
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
    let have = false;
    for (const b of await this.list()) {
      if (b.generation === committed) have = true;
      else if (b.generation < committed) await removeDurably(b.file);
      else throw new TmError(ErrorCodes.STATE, `${b.file} is the base of generation ${b.generation}, newer than the committed generation ${committed}: remove it only if you know why it is there`);
    }
    const file = this.file(committed);
    if (have) return { file, cloned: false };
    const tmp = `${file}.tmp`;
    await clone(this.target, tmp, 'w');
    await fsp.rename(tmp, file);
    await fsyncDir(this.dir);
    return { file, cloned: true };
  }

  /** Generation `committed` is durable on the target: its base goes. */
  async drop(): Promise<void> {
    for (const b of await this.list()) await removeDurably(b.file);
  }

  /**
   * Restore the target from the base of `committed` (the target file must not
   * be in use: a stopped mirror). Idempotent: the base is deleted only after
   * the target was cloned back and fsynced. Returns the generation restored,
   * or null when there was no base (nothing was being applied, or the base was
   * dropped after its commit).
   */
  async rollback(committed: number): Promise<number | null> {
    const bases = await this.list();
    const b = bases.find((x) => x.generation === committed);
    for (const x of bases) if (x.generation < committed) await removeDurably(x.file);
    if (!b) {
      const newer = bases.find((x) => x.generation > committed);
      if (newer) throw new TmError(ErrorCodes.STATE, `${newer.file} is the base of generation ${newer.generation}, newer than the committed generation ${committed}`);
      return null;
    }
    await clone(b.file, this.target, 'r+');
    await removeDurably(b.file);
    return committed;
  }
}

/** Clone all of `from` onto `to` (created with 'w', or an existing file opened 'r+'), then fsync `to`. */
async function clone(from: string, to: string, mode: 'w' | 'r+'): Promise<void> {
  let src: fsp.FileHandle | undefined;
  let dst: fsp.FileHandle | undefined;
  try {
    src = await fsp.open(from, fsc.O_RDONLY);
    dst = await fsp.open(to, mode === 'w' ? fsc.O_RDWR | fsc.O_CREAT | fsc.O_TRUNC : fsc.O_RDWR, 0o600);
    await native().ficlone(dst.fd, src.fd);
    await dst.sync();
  } catch (e) {
    throw asTmError(e, ErrorCodes.VOLUME_IO, `cloning ${from} to ${to} (FICLONE)`);
  } finally {
    await src?.close().catch(() => {});
    await dst?.close().catch(() => {});
  }
}
