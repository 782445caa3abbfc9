import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { writeFileAtomic } from '../util/atomic.js';
import { chunkDigest, chunkDigests, DIGEST_BYTES, ZERO_DIGEST } from '../volume/digest.js';
import type { Volume } from '../volume/volume.js';
import { walk } from '../volume/walk.js';
import { RoaringBitmap32 } from './bitmap-store.js';
import type { ChangeSource, DetectOptions, Detection } from './source.js';

/** How much the scan reads per request (bytes); rounded down to whole chunks by walk(). */
const SCAN_READ_BYTES = 4 * 1024 * 1024;

/**
 * `tracking.mode: scan`: each pass reads every allocated chunk, digests it and
 * compares with the digest of what was last sent for that chunk; unallocated
 * chunks count as zeros without being read. Converges under concurrent writes
 * (a chunk written after it was read differs at the next pass); not a
 * point-in-time image.
 *
 * State: `digests` in the mirror's state directory, DIGEST_BYTES per chunk.
 * An entry may be older than what the secondary holds (then the chunk is sent
 * again: harmless) but never newer than a generation that is pending or
 * committed, because entries are recorded only for bytes being sent in a
 * generation whose bitmap is already on disk.
 */
export class ScanSource implements ChangeSource {
  readonly mode = 'scan';
  private digests: Buffer;
  /** The side was demoted: the digests file is gone and is not written again by this object. */
  private dropped: boolean;
  private readonly file: string;
  /** Chunk range [dirtyFrom, dirtyTo) whose digests changed since the last persist. */
  private dirtyFrom = Infinity;
  private dirtyTo = 0;
  private fileComplete = false;

  constructor(
    private readonly volume: Volume,
    private readonly chunkSize: number,
    stateDir: string,
  ) {
    this.file = path.join(stateDir, 'digests');
    this.dropped = false;
    this.digests = Buffer.alloc(this.chunkCount * DIGEST_BYTES, 0xff);
  }

  get chunkCount(): number {
    return Math.ceil(this.volume.size / this.chunkSize);
  }

  async open(): Promise<void> {
    let buf: Buffer;
    try {
      buf = await fsp.readFile(this.file);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw asTmError(e, ErrorCodes.STATE, `reading ${this.file}`);
    }
    if (buf.length !== this.digests.length) {
      throw new TmError(ErrorCodes.STATE, `${this.file} holds ${buf.length} bytes, expected ${this.digests.length} for ${this.chunkCount} chunks; remove it to rescan`);
    }
    this.digests = buf;
    this.fileComplete = true;
  }

  /** Not point-in-time: every generation reads the live volume. */
  async view(): Promise<Volume> {
    return this.volume;
  }

  async committed(): Promise<void> {}

  async detect(_generation: number, opts: DetectOptions = {}): Promise<Detection> {
    const signal = opts.signal;
    if (opts.all) {
      // Every chunk is sent; what is read for it becomes its digest.
      await this.reset();
      const all = new RoaringBitmap32();
      all.addRange(0, this.chunkCount);
      return { bitmap: all, readBytes: 0 };
    }
    const cs = this.chunkSize;
    const changed = new RoaringBitmap32();
    const fresh = Buffer.alloc(DIGEST_BYTES);
    let readBytes = 0;
    const differs = (digest: Buffer, c: number) => this.digests.compare(digest, 0, DIGEST_BYTES, c * DIGEST_BYTES, (c + 1) * DIGEST_BYTES) !== 0;
    // Holes count as zeros without being read; walk() checks the signal before every read.
    const items = walk(this.volume, { from: 0, to: this.volume.size, window: SCAN_READ_BYTES, chunkSize: cs, signal });
    for await (const w of items) {
      if (w.data === null) {
        for (let c = w.offset / cs; c < Math.ceil((w.offset + w.length) / cs); c++) if (differs(ZERO_DIGEST, c)) changed.add(c);
        continue;
      }
      readBytes += w.length;
      for (let at = 0; at < w.length; at += cs) {
        const c = (w.offset + at) / cs;
        chunkDigest(w.data.subarray(at, Math.min(at + cs, w.length)), fresh, 0);
        if (differs(fresh, c)) changed.add(c);
      }
    }
    return { bitmap: changed, readBytes };
  }

  recordSent(chunk: number, data: Buffer | null, count = 1): void {
    const at = chunk * DIGEST_BYTES;
    if (data === null) this.digests.fill(0, at, at + count * DIGEST_BYTES);
    else chunkDigest(data, this.digests, at);
    this.markDirty(chunk, count);
  }

  recordDigests(chunk: number, digests: Buffer): void {
    digests.copy(this.digests, chunk * DIGEST_BYTES);
    this.markDirty(chunk, digests.length / DIGEST_BYTES);
  }

  /** The digests of `count` chunks from `chunk` changed: the next persist() writes them. */
  private markDirty(chunk: number, count: number): void {
    this.dirtyFrom = Math.min(this.dirtyFrom, chunk);
    this.dirtyTo = Math.max(this.dirtyTo, chunk + count);
  }

  /**
   * Write the changed digests in place and fdatasync. The file is created whole
   * (atomically) the first time; afterwards only the dirty range is rewritten,
   * so a checkpoint costs what changed, not the volume's chunk count. A torn
   * in-place write can only make entries differ from the content, which makes
   * those chunks count as changed: a resend, never a missed change.
   */
  async persist(): Promise<void> {
    if (this.dropped) return;
    // Take the dirty range before the first await: chunks recorded while this
    // write runs mark a new range, persisted next time (never forgotten).
    const dirtyFrom = this.dirtyFrom;
    const dirtyTo = this.dirtyTo;
    this.dirtyFrom = Infinity;
    this.dirtyTo = 0;
    try {
      if (!this.fileComplete) {
        await writeFileAtomic(this.file, this.digests);
        this.fileComplete = true;
      } else if (dirtyTo > dirtyFrom) {
        const from = dirtyFrom * DIGEST_BYTES;
        const to = Math.min(dirtyTo * DIGEST_BYTES, this.digests.length);
        const fh = await fsp.open(this.file, 'r+').catch((e) => {
          throw asTmError(e, ErrorCodes.STATE, `opening ${this.file}`);
        });
        try {
          await fh.write(this.digests, from, to - from, from);
          await fh.datasync();
        } catch (e) {
          throw asTmError(e, ErrorCodes.STATE, `writing ${this.file}`);
        } finally {
          await fh.close();
        }
      }
    } catch (e) {
      this.dirtyFrom = Math.min(this.dirtyFrom, dirtyFrom);
      this.dirtyTo = Math.max(this.dirtyTo, dirtyTo);
      throw e;
    }
  }

  /** The volume now is the committed image: its digests become the base (reads every allocated chunk once). */
  async rebase(): Promise<void> {
    const cs = this.chunkSize;
    this.digests.fill(0);
    for await (const w of walk(this.volume, { from: 0, to: this.volume.size, window: SCAN_READ_BYTES, chunkSize: cs })) {
      if (w.data === null) continue;
      (await chunkDigests(w.data.subarray(0, w.length), cs)).copy(this.digests, (w.offset / cs) * DIGEST_BYTES);
    }
    this.fileComplete = false;
    await this.persist();
  }

  async drop(): Promise<void> {
    this.dropped = true;
    await fsp.rm(this.file, { force: true });
    this.fileComplete = false;
    this.digests.fill(0xff);
  }

  async reset(): Promise<void> {
    this.digests.fill(0xff);
    this.fileComplete = false;
    await this.persist();
  }

  async close(): Promise<void> {
    await this.persist();
  }
}
