import { constants as fsc, promises as fsp } from 'node:fs';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { native, type NativeOps } from '../native/index.js';
import { alignRanges, type ByteRange, type Volume, type VolumeCapabilities } from './volume.js';

/** Errors meaning "this way of zeroing is not available here": try the next one, remember. */
const UNSUPPORTED = new Set(['EOPNOTSUPP', 'ENOTSUP', 'ENOTTY', 'EINVAL', 'ENOSYS']);
/** Zeros written per request when the filesystem can neither punch nor zero a range. */
const ZERO_WRITE_BYTES = 1024 * 1024;
let zeroBuffer: Buffer | undefined;

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
export class SparseFileVolume implements Volume {
  readonly capabilities: VolumeCapabilities;
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly fh: fsp.FileHandle,
    readonly size: number,
    readonly kind: 'file' | 'block',
    private readonly ops: NativeOps,
  ) {
    this.capabilities = { allocationMap: kind === 'file', punchHole: true, zeroRange: true };
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
      if (st.isBlockDevice()) return new SparseFileVolume(file, fh, ops.blkGetSize64(fh.fd), 'block', ops);
      if (!st.isFile()) throw new TmError(ErrorCodes.VOLUME_IO, `volume ${file} is neither a regular file nor a block device`);
      return new SparseFileVolume(file, fh, st.size, 'file', ops);
    } catch (e) {
      await fh.close();
      throw asTmError(e, ErrorCodes.VOLUME_IO, `volume ${file}`);
    }
  }

  private check(offset: number, length: number, what: string): void {
    if (this.closed) throw new TmError(ErrorCodes.VOLUME_IO, `volume ${this.path} is closed`);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new TmError(ErrorCodes.VOLUME_RANGE, `${what} ${offset}+${length} is outside volume ${this.path} (${this.size} bytes)`);
    }
  }

  async allocated(alignTo?: number): Promise<ByteRange[]> {
    this.check(0, 0, 'allocation map');
    if (this.kind === 'block') return this.size > 0 ? [{ offset: 0, length: this.size }] : [];
    const fd = this.fh.fd;
    const out: ByteRange[] = [];
    let pos = 0;
    try {
      while (pos < this.size) {
        const data = this.ops.seekData(fd, pos);
        if (data < 0 || data >= this.size) break;
        let hole = this.ops.seekHole(fd, data);
        if (hole < 0 || hole > this.size) hole = this.size;
        out.push({ offset: data, length: hole - data });
        pos = hole;
      }
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `allocation map of ${this.path}`);
    }
    return alignTo ? alignRanges(out, alignTo, this.size) : out;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.check(offset, length, 'read');
    const buf = into && into.length >= length ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    let done = 0;
    try {
      while (done < length) {
        const { bytesRead } = await this.fh.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) throw new TmError(ErrorCodes.VOLUME_IO, `volume ${this.path} ended at ${offset + done}, expected ${this.size} bytes (did it shrink?)`);
        done += bytesRead;
      }
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `reading ${this.path} at ${offset}+${length}`);
    }
    return buf;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.check(offset, data.length, 'write');
    let done = 0;
    try {
      while (done < data.length) {
        const { bytesWritten } = await this.fh.write(data, done, data.length - done, offset + done);
        done += bytesWritten;
      }
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `writing ${this.path} at ${offset}+${data.length}`);
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    this.check(offset, length, 'zero');
    if (length === 0) return;
    const fd = this.fh.fd;
    const c = this.capabilities;
    if (c.punchHole && this.kind === 'file') {
      try {
        return await this.ops.punchHole(fd, offset, length);
      } catch (e) {
        if (!UNSUPPORTED.has((e as NodeJS.ErrnoException).code ?? '')) throw asTmError(e, ErrorCodes.VOLUME_IO, `punching a hole in ${this.path} at ${offset}+${length}`);
        c.punchHole = false;
      }
    }
    if (c.zeroRange) {
      try {
        return await this.ops.zeroRange(fd, offset, length);
      } catch (e) {
        if (!UNSUPPORTED.has((e as NodeJS.ErrnoException).code ?? '')) throw asTmError(e, ErrorCodes.VOLUME_IO, `zeroing ${this.path} at ${offset}+${length}`);
        c.zeroRange = false;
      }
    }
    zeroBuffer ??= Buffer.alloc(ZERO_WRITE_BYTES);
    for (let at = 0; at < length; at += ZERO_WRITE_BYTES) {
      await this.write(offset + at, zeroBuffer.subarray(0, Math.min(ZERO_WRITE_BYTES, length - at)));
    }
  }

  async flush(): Promise<void> {
    if (this.closed) return;
    try {
      await this.fh.datasync();
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `flushing ${this.path}`);
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }
}
