import { constants as fsc, promises as fsp } from 'node:fs';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { native, type NativeOps } from '../native/index.js';
import { alignRanges, mergeRanges, type ByteRange, type Volume, type VolumeCapabilities } from './volume.js';

/** Errors meaning "this way of zeroing is not available on this device": try the next one, remember. */
const UNSUPPORTED = new Set(['EOPNOTSUPP', 'ENOTSUP', 'ENOTTY', 'EINVAL', 'ENOSYS']);
/**
 * fallocate on a block device needs offsets and lengths aligned to its logical
 * block size; 4 KiB is a multiple of every logical block size in use, so the
 * aligned middle of a range goes to fallocate and the edges are written.
 */
const FALLOCATE_ALIGN = 4096;
const ZERO_WRITE_BYTES = 1024 * 1024;
let zeroBuffer: Buffer | undefined;

export interface BlockDeviceOptions {
  readOnly?: boolean;
  /**
   * Where the device's data is, when something knows (for an LVM thin
   * snapshot: its mappings from the pool metadata). Without it the whole
   * device counts as allocated.
   */
  allocated?: () => Promise<ByteRange[]>;
  /** The native operations (tests inject failing ones to exercise fallbacks). */
  ops?: NativeOps;
}

/**
 * A volume on a block device (an LVM thin volume or snapshot, a loop device,
 * a disk). The size comes from BLKGETSIZE64.
 *
 * zero(): fallocate(PUNCH_HOLE) first, which the kernel turns into a
 * write-zeroes request that may unmap (on a thin volume it gives the blocks
 * back to the pool) and which fails rather than writing when the device cannot
 * do it (BLKDEV_ZERO_NOFALLBACK); then fallocate(ZERO_RANGE) (zeroes without
 * unmapping, written by the kernel if need be); then plain writes of zeros.
 * BLKDISCARD is not used: a discard does not promise that the range reads
 * back as zeros. The first refusal of a method is remembered.
 */
export class BlockDeviceVolume implements Volume {
  readonly kind = 'block' as const;
  readonly capabilities: VolumeCapabilities;
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly fh: fsp.FileHandle,
    readonly size: number,
    private readonly readOnly: boolean,
    private readonly map: (() => Promise<ByteRange[]>) | undefined,
    private readonly ops: NativeOps,
  ) {
    this.capabilities = { allocationMap: map !== undefined, punchHole: !readOnly, zeroRange: !readOnly };
  }

  static async open(device: string, o: BlockDeviceOptions = {}): Promise<BlockDeviceVolume> {
    const ops = o.ops ?? native();
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(device, o.readOnly ? fsc.O_RDONLY : fsc.O_RDWR);
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `opening block device ${device}`);
    }
    try {
      const st = await fh.stat();
      if (!st.isBlockDevice()) throw new TmError(ErrorCodes.VOLUME_IO, `${device} is not a block device`);
      const size = ops.blkGetSize64(fh.fd);
      return new BlockDeviceVolume(device, fh, size, o.readOnly === true, o.allocated, ops);
    } catch (e) {
      await fh.close();
      throw asTmError(e, ErrorCodes.VOLUME_IO, `block device ${device}`);
    }
  }

  private check(offset: number, length: number, what: string): void {
    if (this.closed) throw new TmError(ErrorCodes.VOLUME_IO, `volume ${this.path} is closed`);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new TmError(ErrorCodes.VOLUME_RANGE, `${what} ${offset}+${length} is outside volume ${this.path} (${this.size} bytes)`);
    }
  }

  private checkWritable(what: string): void {
    if (this.readOnly) throw new TmError(ErrorCodes.VOLUME_IO, `${what}: ${this.path} is open read-only`);
  }

  async allocated(alignTo?: number): Promise<ByteRange[]> {
    this.check(0, 0, 'allocation map');
    let ranges: ByteRange[];
    if (this.map) {
      try {
        ranges = mergeRanges((await this.map()).map((r) => ({ offset: r.offset, length: Math.min(r.offset + r.length, this.size) - r.offset })));
      } catch (e) {
        throw asTmError(e, ErrorCodes.VOLUME_IO, `allocation map of ${this.path}`);
      }
    } else {
      ranges = this.size > 0 ? [{ offset: 0, length: this.size }] : [];
    }
    return alignTo ? alignRanges(ranges, alignTo, this.size) : ranges;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.check(offset, length, 'read');
    const buf = into && into.length >= length ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    let done = 0;
    try {
      while (done < length) {
        const { bytesRead } = await this.fh.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) throw new TmError(ErrorCodes.VOLUME_IO, `block device ${this.path} ended at ${offset + done}, expected ${this.size} bytes (did it shrink?)`);
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

  private async writeZeros(offset: number, length: number): Promise<void> {
    zeroBuffer ??= Buffer.alloc(ZERO_WRITE_BYTES);
    for (let at = 0; at < length; at += ZERO_WRITE_BYTES) {
      await this.write(offset + at, zeroBuffer.subarray(0, Math.min(ZERO_WRITE_BYTES, length - at)));
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    this.check(offset, length, 'zero');
    this.checkWritable('zero');
    if (length === 0) return;
    const end = offset + length;
    const midStart = Math.ceil(offset / FALLOCATE_ALIGN) * FALLOCATE_ALIGN;
    const midEnd = Math.floor(end / FALLOCATE_ALIGN) * FALLOCATE_ALIGN;
    if (midEnd <= midStart) return this.writeZeros(offset, length);
    if (midStart > offset) await this.writeZeros(offset, midStart - offset);
    await this.zeroAligned(midStart, midEnd - midStart);
    if (end > midEnd) await this.writeZeros(midEnd, end - midEnd);
  }

  private async zeroAligned(offset: number, length: number): Promise<void> {
    const fd = this.fh.fd;
    const c = this.capabilities;
    if (c.punchHole) {
      try {
        return await this.ops.punchHole(fd, offset, length);
      } catch (e) {
        if (!UNSUPPORTED.has((e as NodeJS.ErrnoException).code ?? '')) throw asTmError(e, ErrorCodes.VOLUME_IO, `unmapping ${this.path} at ${offset}+${length}`);
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
