import type { promises as fsp } from 'node:fs';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import type { NativeOps } from '../native/index.js';
import { checkPieces } from './pieces.js';
import { checkAccess, checkWritable, type ByteRange, type Volume, type VolumeCapabilities } from './volume.js';

/** Errors meaning "this way of zeroing is not available here": try the next one, remember. */
const UNSUPPORTED = new Set(['EOPNOTSUPP', 'ENOTSUP', 'ENOTTY', 'EINVAL', 'ENOSYS']);
/** Zeros written per request when neither punching nor zero-range works. */
const ZERO_WRITE_BYTES = 1024 * 1024;
let zeroBuffer: Buffer | undefined;
/** Pieces per native preadPieces / pwritePieces call (the addon's limit); a longer list takes several calls, one after the other. */
const PIECES_PER_CALL = 1 << 20;

/**
 * What every volume on an open file descriptor shares (sparse file, block
 * device): range checks, full reads and writes, the zeroing fallback chain
 * (punch hole, then zero range, then writing zeros; a refusal is remembered),
 * flush and close. Subclasses give the allocation map and how to zero.
 */
export abstract class HandleVolume implements Volume {
  readonly capabilities: VolumeCapabilities;
  protected closed = false;
  /** Native jobs on `fh.fd` not finished yet: close() waits for them (FileHandle only waits for its own operations). */
  private nativeJobs = 0;
  private nativeIdle: (() => void)[] = [];

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

  /**
   * Read the pieces packed one after the other into `into` with one
   * threadpool job per {@link PIECES_PER_CALL} pieces (one piece: read()).
   */
  async readPieces(pieces: readonly ByteRange[], into: Buffer): Promise<Buffer> {
    const total = this.pieceTotal(pieces, 'read', 'reading');
    if (into.length < total) throw new TmError(ErrorCodes.INTERNAL, `reading ${this.path}: ${pieces.length} pieces of ${total} bytes do not fit in ${into.length} bytes`);
    if (pieces.length === 1) return this.read(pieces[0]!.offset, total, into);
    try {
      await this.batches(pieces, into, (fd, positions, lengths, buf) => this.ops.preadPieces(fd, positions, lengths, buf));
    } catch (e) {
      const what = `reading ${this.path}: ${describePieces(pieces)}`;
      const err = e as NodeJS.ErrnoException & { position?: number };
      if (err?.code === 'EOF_SHORT') throw new TmError(ErrorCodes.VOLUME_IO, `${what}: volume ${this.path} ended at ${err.position}, expected ${this.size} bytes (did it shrink?)`, { cause: e });
      throw asTmError(e, ErrorCodes.VOLUME_IO, what);
    }
    return into.subarray(0, total);
  }

  /** Write `data`'s consecutive bytes to the pieces with one threadpool job per {@link PIECES_PER_CALL} pieces (one piece: write()). */
  async writePieces(pieces: readonly ByteRange[], data: Buffer): Promise<void> {
    const total = this.pieceTotal(pieces, 'write', 'writing');
    this.checkWritable('write');
    if (data.length !== total) throw new TmError(ErrorCodes.INTERNAL, `writing ${this.path}: ${data.length} bytes for ${pieces.length} pieces of ${total} bytes`);
    if (pieces.length === 1) return this.write(pieces[0]!.offset, data);
    try {
      await this.batches(pieces, data, (fd, positions, lengths, buf) => this.ops.pwritePieces(fd, positions, lengths, buf));
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `writing ${this.path}: ${describePieces(pieces)}`);
    }
  }

  /** Every piece inside the volume (open), ascending, not overlapping; their total length. */
  private pieceTotal(pieces: readonly ByteRange[], what: string, doing: string): number {
    this.check(0, 0, what);
    for (const p of pieces) this.check(p.offset, p.length, what);
    return checkPieces(this, pieces, doing);
  }

  /** `op` over the pieces, at most PIECES_PER_CALL per call, each call's bytes following the last one's in `buf`. */
  private async batches(
    pieces: readonly ByteRange[],
    buf: Buffer,
    op: (fd: number, positions: Float64Array, lengths: Float64Array, buf: Buffer) => Promise<void>,
  ): Promise<void> {
    let at = 0;
    for (let from = 0; from < pieces.length; from += PIECES_PER_CALL) {
      const n = Math.min(PIECES_PER_CALL, pieces.length - from);
      const positions = new Float64Array(n);
      const lengths = new Float64Array(n);
      let bytes = 0;
      for (let i = 0; i < n; i++) {
        const p = pieces[from + i]!;
        positions[i] = p.offset;
        lengths[i] = p.length;
        bytes += p.length;
      }
      await this.nativeJob(() => op(this.fh.fd, positions, lengths, buf.subarray(at, at + bytes)));
      at += bytes;
    }
  }

  /**
   * Run a native job on `fh.fd`, counted: close() waits until none is left
   * before closing the descriptor (whose number could otherwise name another
   * file by the time the threadpool gets to it). Refused once close() has
   * begun (TM_ERR_VOLUME_IO): a job that follows another, as the batches of a
   * long list or zero-range after a refused punch, does not start then.
   */
  protected async nativeJob<T>(job: () => Promise<T>): Promise<T> {
    if (this.closed) throw new TmError(ErrorCodes.VOLUME_IO, `volume ${this.path} is closed`);
    this.nativeJobs++;
    try {
      return await job();
    } finally {
      if (--this.nativeJobs === 0) for (const wake of this.nativeIdle.splice(0)) wake();
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
        return await this.nativeJob(() => this.ops.punchHole(fd, offset, length));
      } catch (e) {
        if (!UNSUPPORTED.has((e as NodeJS.ErrnoException).code ?? '')) throw asTmError(e, ErrorCodes.VOLUME_IO, `punching a hole in ${this.path} at ${offset}+${length}`);
        c.punchHole = false;
      }
    }
    if (c.zeroRange) {
      try {
        return await this.nativeJob(() => this.ops.zeroRange(fd, offset, length));
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
    if (this.nativeJobs > 0) await new Promise<void>((resolve) => this.nativeIdle.push(resolve));
    await this.fh.close();
  }
}

/** "N pieces from FIRST..END" for messages. */
function describePieces(pieces: readonly ByteRange[]): string {
  const first = pieces[0]!;
  const last = pieces[pieces.length - 1]!;
  return `${pieces.length} pieces from ${first.offset}..${last.offset + last.length}`;
}
