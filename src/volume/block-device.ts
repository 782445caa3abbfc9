import { constants as fsc, promises as fsp } from 'node:fs';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { native, type NativeOps } from '../native/index.js';
import { HandleVolume } from './handle-volume.js';
import { alignRanges, clipRanges, mergeRanges, type ByteRange } from './volume.js';

/**
 * fallocate on a block device needs offsets and lengths aligned to its logical
 * block size; 4 KiB is a multiple of every logical block size in use, so the
 * aligned middle of a range goes to fallocate and the edges are written.
 */
const FALLOCATE_ALIGN = 4096;

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
export class BlockDeviceVolume extends HandleVolume {
  private constructor(
    path: string,
    fh: fsp.FileHandle,
    size: number,
    readOnly: boolean,
    private readonly map: (() => Promise<ByteRange[]>) | undefined,
    ops: NativeOps,
  ) {
    super(path, fh, size, 'block', readOnly, ops, map !== undefined);
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

  async allocated(alignTo?: number, within?: ByteRange): Promise<ByteRange[]> {
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
    ranges = clipRanges(ranges, within);
    return alignTo ? alignRanges(ranges, alignTo, this.size) : ranges;
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
    await this.zeroChain(midStart, midEnd - midStart);
    if (end > midEnd) await this.writeZeros(midEnd, end - midEnd);
  }
}
