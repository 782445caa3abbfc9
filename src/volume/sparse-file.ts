import { constants as fsc, promises as fsp } from 'node:fs';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { native, type NativeOps } from '../native/index.js';
import { HandleVolume } from './handle-volume.js';
import { alignRanges, clipRanges, RangeBuilder, type ByteRange } from './volume.js';

/** Ranges per threadpool call of the allocation walk: a few ms of work for the event loop per batch. */
const SEEK_BATCH = 16384;

export interface OpenOptions {
  /** Create a sparse file of this size when the path does not exist. */
  create?: { size: number };
  readOnly?: boolean;
  /** The native operations (tests inject failing ones to exercise fallbacks). */
  ops?: NativeOps;
}

/**
 * A volume in a sparse file (or a block device opened as a file). The
 * allocation map comes from SEEK_DATA/SEEK_HOLE; zeroing punches holes, falling
 * back to FALLOC_FL_ZERO_RANGE and then to writing zeros, and remembers after
 * the first refusal which method does not work here.
 */
export class SparseFileVolume extends HandleVolume {
  private constructor(path: string, fh: fsp.FileHandle, size: number, kind: 'file' | 'block', readOnly: boolean, ops: NativeOps) {
    super(path, fh, size, kind, readOnly, ops, kind === 'file');
    // On a block device opened as a file, zeroing starts at zero-range.
    if (kind === 'block') this.capabilities.punchHole = false;
  }

  static async open(file: string, o: OpenOptions = {}): Promise<SparseFileVolume> {
    const ops = o.ops ?? native();
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(file, o.readOnly ? fsc.O_RDONLY : fsc.O_RDWR);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT' && o.create && !o.readOnly) {
        try {
          fh = await fsp.open(file, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL, 0o600);
          await fh.truncate(o.create.size);
          await fh.sync();
        } catch (e2) {
          throw asTmError(e2, ErrorCodes.VOLUME_IO, `creating volume ${file}`);
        }
      } else {
        throw asTmError(e, ErrorCodes.VOLUME_IO, `opening volume ${file}`);
      }
    }
    try {
      const st = await fh.stat();
      if (st.isBlockDevice()) return new SparseFileVolume(file, fh, ops.blkGetSize64(fh.fd), 'block', o.readOnly === true, ops);
      if (!st.isFile()) throw new TmError(ErrorCodes.VOLUME_IO, `volume ${file} is neither a regular file nor a block device`);
      return new SparseFileVolume(file, fh, st.size, 'file', o.readOnly === true, ops);
    } catch (e) {
      await fh.close();
      throw asTmError(e, ErrorCodes.VOLUME_IO, `volume ${file}`);
    }
  }

  async allocated(alignTo?: number, within?: ByteRange): Promise<ByteRange[]> {
    this.check(0, 0, 'allocation map');
    const from = Math.max(0, within?.offset ?? 0);
    const to = Math.min(this.size, within ? within.offset + within.length : this.size);
    if (this.kind === 'block') {
      const all = clipRanges(this.size > 0 ? [{ offset: 0, length: this.size }] : [], { offset: from, length: to - from });
      return alignTo ? alignRanges(all, alignTo, this.size) : all;
    }
    const out = new RangeBuilder(this.size, alignTo);
    await this.walk(from, to, (offset, end) => out.add(offset, end));
    return out.ranges;
  }

  async allocatedBytes(): Promise<number> {
    this.check(0, 0, 'allocation map');
    if (this.kind === 'block') return this.size;
    let n = 0;
    await this.walk(0, this.size, (offset, end) => (n += end - offset));
    return n;
  }

  /** Every allocated range in [from, to), clipped to it, in order, to `each`. */
  private async walk(from: number, to: number, each: (offset: number, end: number) => void): Promise<void> {
    const fd = this.fh.fd;
    // The system calls (two per range) run on the threadpool, a batch at a
    // time: a filesystem may hold one behind a writer's lock for seconds (seen
    // on XFS, the replica being written and flushed meanwhile), and a million
    // ranges take seconds anyway. The event loop only gets the results.
    let pos = from;
    try {
      while (pos < to) {
        const batch = await this.ops.seekMap(fd, pos, to, SEEK_BATCH);
        // Closed meanwhile: its descriptor number may already name another file.
        if (this.closed) throw new TmError(ErrorCodes.VOLUME_IO, `volume ${this.path} was closed during its allocation map`);
        for (let i = 0; i < batch.length; i += 2) {
          const hole = Math.min(batch[i + 1]!, this.size);
          each(batch[i]!, Math.min(hole, to));
          pos = hole;
        }
        if (batch.length < 2 * SEEK_BATCH) break;
      }
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `allocation map of ${this.path}`);
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    this.check(offset, length, 'zero');
    this.checkWritable('zero');
    if (length === 0) return;
    await this.zeroChain(offset, length);
  }
}
