import type { promises as fsp } from 'node:fs';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import type { NativeOps } from '../native/index.js';
import { checkAccess, checkWritable, type ByteRange, type Volume, type VolumeCapabilities } from './volume.js';

/** Errors meaning "this way of zeroing is not available here": try the next one, remember. */
const UNSUPPORTED = new Set(['EOPNOTSUPP', 'ENOTSUP', 'ENOTTY', 'EINVAL', 'ENOSYS']);
/** Zeros written per request when neither punching nor zero-range works. */
const ZERO_WRITE_BYTES = 1024 * 1024;
let zeroBuffer: Buffer | undefined;

/**
 * What every volume on an open file descriptor shares (sparse file, block
 * device): range checks, full reads and writes, the zeroing fallback chain
 * (punch hole, then zero range, then writing zeros; a refusal is remembered),
 * flush and close. Subclasses give the allocation map and how to zero.
 */
export abstract class HandleVolume implements Volume {
  readonly capabilities: VolumeCapabilities;
  protected closed = false;

  protected constructor(
    readonly path: string,
    protected readonly fh: fsp.FileHandle,
    readonly size: number,
    readonly kind: 'file' | 'block',
    protected readonly readOnly: boolean,
    protected readonly ops: NativeOps,
    allocationMap: boolean,
  ) {
    this.capabilities = { allocationMap, punchHole: !readOnly, zeroRange: !readOnly };
  }

  abstract allocated(alignTo?: number, within?: ByteRange): Promise<ByteRange[]>;
  abstract zero(offset: number, length: number): Promise<void>;

  protected check(offset: number, length: number, what: string): void {
    checkAccess(this, this.closed, offset, length, what);
  }

  protected checkWritable(what: string): void {
    checkWritable(this, this.readOnly, what);
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
    this.checkWritable('write');
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

  protected async writeZeros(offset: number, length: number): Promise<void> {
    zeroBuffer ??= Buffer.alloc(ZERO_WRITE_BYTES);
    for (let at = 0; at < length; at += ZERO_WRITE_BYTES) {
      await this.write(offset + at, zeroBuffer.subarray(0, Math.min(ZERO_WRITE_BYTES, length - at)));
    }
  }

  /** Punch (deallocate), else zero-range, else write zeros; the first refusal of a method is remembered. */
  protected async zeroChain(offset: number, length: number): Promise<void> {
    const fd = this.fh.fd;
    const c = this.capabilities;
    if (c.punchHole) {
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
    await this.writeZeros(offset, length);
  }

  async flush(): Promise<void> {
    if (this.closed || this.readOnly) return;
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
