import { constants as fsc, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { fiemap, FiemapFlags, native, type FiemapExtent } from '../native/index.js';
import { fsyncDir } from '../util/atomic.js';
import { ReflinkBase } from '../volume/reflink-base.js';
import { SparseFileVolume } from '../volume/sparse-file.js';
import type { Volume } from '../volume/volume.js';
import { RoaringBitmap32 } from './bitmap-store.js';
import type { ChangeSource, DetectOptions, Detection, DetectSteps } from './source.js';

/** Flags after which an extent's physical address says nothing reliable about its content. */
const OPAQUE =
  FiemapFlags.UNKNOWN | FiemapFlags.DELALLOC | FiemapFlags.ENCODED | FiemapFlags.DATA_ENCRYPTED | FiemapFlags.NOT_ALIGNED | FiemapFlags.DATA_INLINE | FiemapFlags.DATA_TAIL;

const SNAP = /^snap-(\d+)\.img$/;

interface Mapped {
  logical: number;
  end: number;
  physical: number;
  flags: number;
}

/** Extents that hold data, sorted; unwritten (preallocated) extents read as zeros and count as holes. */
function written(map: FiemapExtent[], size: number): Mapped[] {
  const out: Mapped[] = [];
  for (const e of map) {
    if (e.flags & FiemapFlags.UNWRITTEN) continue;
    const end = Math.min(e.logical + e.length, size);
    if (end <= e.logical) continue;
    out.push({ logical: e.logical, end, physical: e.physical, flags: e.flags & ~(FiemapFlags.LAST | FiemapFlags.SHARED | FiemapFlags.MERGED) });
  }
  out.sort((a, b) => a.logical - b.logical);
  return out;
}

/**
 * Chunks whose logical → physical translation differs between two FIEMAP maps
 * of one file at two points in time (two reflink snapshots): a chunk is
 * unchanged only when every byte of it is unmapped (or unwritten) in both, or
 * mapped to the same physical byte in both. Copy-on-write filesystems give a
 * rewritten block a new physical address while it is shared with the older
 * snapshot, so equal translation means equal content. Extents whose address
 * is not a plain block address (encoded, inline, delalloc, unknown) are
 * unchanged only when both maps report the identical extent.
 */
export function diffMaps(before: FiemapExtent[], after: FiemapExtent[], size: number, chunkSize: number): RoaringBitmap32 {
  const A = written(before, size);
  const B = written(after, size);
  const chunks = Math.ceil(size / chunkSize);
  const out = new RoaringBitmap32();
  let i = 0;
  let j = 0;
  let pos = 0;
  for (;;) {
    while (i < A.length && A[i]!.end <= pos) i++;
    while (j < B.length && B[j]!.end <= pos) j++;
    const a = A[i];
    const b = B[j];
    if (!a && !b) break;
    const aIn = a !== undefined && a.logical <= pos;
    const bIn = b !== undefined && b.logical <= pos;
    let next = Infinity;
    if (a) next = Math.min(next, aIn ? a.end : a.logical);
    if (b) next = Math.min(next, bIn ? b.end : b.logical);
    if (aIn || bIn) {
      let same = false;
      if (aIn && bIn) {
        if ((a.flags | b.flags) & OPAQUE) {
          same = a.logical === b.logical && a.end === b.end && a.physical === b.physical && a.flags === b.flags;
        } else {
          same = a.physical - a.logical === b.physical - b.logical;
        }
      }
      if (!same) out.addRange(Math.floor(pos / chunkSize), Math.min(Math.ceil(next / chunkSize), chunks));
    }
    pos = next;
  }
  return out;
}

/**
 * `tracking.mode: reflink` for sparse files on XFS or btrfs. Each generation N
 * reads from `snap-N.img`, a FICLONE snapshot of the volume in the mirror's
 * state directory (same filesystem), so it is a point-in-time image while the
 * application keeps writing. Changes are found by comparing the FIEMAP map of
 * snapshot N with that of the last committed generation's snapshot: metadata
 * only, nothing is read.
 *
 * On disk: the committed generation's snapshot (the base of the next
 * comparison) and the pending generation's (until the secondary commits it).
 * A snapshot appears under its final name only after FICLONE and fsync (temp
 * file, rename, fsync of the directory), so a crash leaves either none or a
 * whole one; leftovers are removed at open. A missing base (state directory
 * damaged) is reported as `baseLost`: the caller must not trust "nothing
 * changed".
 */
export class ReflinkSource implements ChangeSource {
  readonly mode = 'reflink';
  private readonly views = new Map<number, SparseFileVolume>();
  private base = 0;

  constructor(
    private readonly volumePath: string,
    private readonly volumeSize: number,
    private readonly chunkSize: number,
    private readonly dir: string,
  ) {}

  snapshotPath(generation: number): string {
    return path.join(this.dir, `snap-${generation}.img`);
  }

  private get chunkCount(): number {
    return Math.ceil(this.volumeSize / this.chunkSize);
  }

  /** Keep the committed generation's snapshot and the pending one's; remove everything else. */
  async open(generation: number, committedGeneration: number): Promise<void> {
    this.base = committedGeneration;
    const keep = new Set([committedGeneration, generation > committedGeneration ? generation : -1]);
    const names = await fsp.readdir(this.dir).catch((e) => {
      throw asTmError(e, ErrorCodes.STATE, `listing ${this.dir}`);
    });
    let removed = false;
    for (const n of names) {
      const m = SNAP.exec(n);
      if ((m && !keep.has(Number(m[1]))) || /^snap-\d+\.img\.tmp$/.test(n)) {
        await fsp.rm(path.join(this.dir, n), { force: true });
        removed = true;
      }
    }
    if (removed) await fsyncDir(this.dir);
  }

  /** Snapshot the volume as generation `generation` and compare it with the base. */
  async detect(generation: number, opts: DetectOptions = {}): Promise<Detection> {
    const snap = this.snapshotPath(generation);
    await this.closeView(generation);
    // The clone holds every write that completed before the call (XFS and btrfs flush the source's dirty pages first).
    const viewAt = Date.now();
    let t = performance.now();
    await this.clone(snap);
    const steps: DetectSteps = { snapshot: (performance.now() - t) / 1000 };
    opts.signal?.throwIfAborted();
    const all = () => {
      const b = new RoaringBitmap32();
      b.addRange(0, this.chunkCount);
      return b;
    };
    if (opts.all) return { bitmap: all(), readBytes: 0, viewAt, steps };
    const basePath = this.snapshotPath(this.base);
    t = performance.now();
    const [before, after] = await Promise.all([this.map(basePath), this.map(snap)]);
    steps.fiemap = (performance.now() - t) / 1000;
    if (before === null) return { bitmap: all(), readBytes: 0, baseLost: true, viewAt, steps };
    t = performance.now();
    const bitmap = diffMaps(before, after!, this.volumeSize, this.chunkSize);
    steps.diff = (performance.now() - t) / 1000;
    if (bitmap.isEmpty) {
      // Nothing to send: this snapshot would only be a second copy of the base.
      await fsp.rm(snap, { force: true });
    }
    return { bitmap, readBytes: 0, viewAt, steps };
  }

  /** FIEMAP of a snapshot; null when it does not exist. */
  private async map(file: string): Promise<FiemapExtent[] | null> {
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(file, fsc.O_RDONLY);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw asTmError(e, ErrorCodes.STATE, `opening snapshot ${file}`);
    }
    try {
      return await fiemap(fh.fd, 0, this.volumeSize, true);
    } catch (e) {
      throw asTmError(e, ErrorCodes.NATIVE, `FIEMAP of ${file}`);
    } finally {
      await fh.close();
    }
  }

  /** FICLONE the volume into `dest` (temp, fsync, rename, fsync dir). */
  private async clone(dest: string): Promise<void> {
    const tmp = `${dest}.tmp`;
    await fsp.rm(tmp, { force: true });
    let src: fsp.FileHandle | undefined;
    let out: fsp.FileHandle | undefined;
    try {
      src = await fsp.open(this.volumePath, fsc.O_RDONLY);
      out = await fsp.open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, 0o600);
      await native().ficlone(out.fd, src.fd);
      await out.sync();
    } catch (e) {
      await out?.close().catch(() => {});
      out = undefined;
      await fsp.rm(tmp, { force: true });
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EXDEV' || code === 'EOPNOTSUPP' || code === 'EINVAL' || code === 'ENOTTY') {
        throw new TmError(
          ErrorCodes.TRACKING,
          `cannot reflink ${this.volumePath} into ${this.dir} (${code}): the state directory must be on the same XFS (reflink=1) or btrfs filesystem as the volume; use tracking.mode scan or auto`,
          { cause: e },
        );
      }
      throw asTmError(e, ErrorCodes.TRACKING, `snapshotting ${this.volumePath} into ${tmp}`);
    } finally {
      await src?.close().catch(() => {});
      await out?.close().catch(() => {});
    }
    await fsp.rename(tmp, dest);
    await fsyncDir(this.dir);
  }

  async view(generation: number): Promise<Volume> {
    let v = this.views.get(generation);
    if (!v) {
      const file = this.snapshotPath(generation);
      try {
        v = await SparseFileVolume.open(file, { readOnly: true });
      } catch (e) {
        throw new TmError(ErrorCodes.TRACKING, `the snapshot of generation ${generation} (${file}) is missing or unreadable: ${(e as Error).message}`, { cause: e });
      }
      this.views.set(generation, v);
    }
    return v;
  }

  private async closeView(generation: number): Promise<void> {
    const v = this.views.get(generation);
    this.views.delete(generation);
    await v?.close();
  }

  /** Generation `generation` is the new base: older snapshots go. */
  async committed(generation: number): Promise<void> {
    const old = this.base;
    this.base = generation;
    for (const g of [...this.views.keys()]) if (g < generation) await this.closeView(g);
    if (old !== generation) {
      await fsp.rm(this.snapshotPath(old), { force: true });
      await fsyncDir(this.dir);
    }
  }

  recordSent(): void {}

  async persist(): Promise<void> {}

  /** Forget the base: the next pass counts every chunk as changed. */
  async reset(): Promise<void> {
    await this.closeView(this.base);
    await fsp.rm(this.snapshotPath(this.base), { force: true });
  }

  /** The volume now is generation `generation`'s image: snapshot it as the base (FICLONE: metadata only). */
  async rebase(generation: number): Promise<void> {
    for (const g of [...this.views.keys()]) await this.closeView(g);
    await this.clone(this.snapshotPath(generation));
    await this.open(generation, generation);
  }

  async drop(): Promise<void> {
    await this.close();
    const names = await fsp.readdir(this.dir).catch(() => [] as string[]);
    for (const n of names) if (SNAP.test(n) || /^snap-\d+\.img\.tmp$/.test(n)) await fsp.rm(path.join(this.dir, n), { force: true });
    await fsyncDir(this.dir);
  }

  async close(): Promise<void> {
    for (const g of [...this.views.keys()]) await this.closeView(g);
  }
}

/**
 * Whether FICLONE works from `volumePath` into `dir` (same filesystem,
 * reflink supported), and why not: the probe the consistency mode also uses
 * (volume/reflink-base.ts).
 */
export function reflinkUsable(volumePath: string, dir: string): Promise<{ ok: true } | { ok: false; reason: string }> {
  return ReflinkBase.usable(volumePath, dir);
}
