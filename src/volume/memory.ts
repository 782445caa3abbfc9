import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { alignRanges, checkAccess, clipRanges, checkWritable, type ByteRange, type Volume, type VolumeCapabilities } from './volume.js';

/** Allocation granularity of a memory volume (bytes): what a filesystem block is to a sparse file. */
export const MEMORY_BLOCK = 4096;

/** Operations {@link MemoryVolume.failNext} can make fail. */
export type MemoryFaultOp = 'read' | 'write' | 'zero' | 'flush';

/**
 * The data of a memory volume, shared by all its handles. Blocks absent from
 * the map are holes (read as zeros). Every block is MEMORY_BLOCK bytes; in the
 * last block the bytes past `size` stay zero and are never visible.
 */
class MemoryStore {
  readonly blocks = new Map<number, Buffer>();
  flushes = 0;
  reads = 0;
  readonly faults = new Map<MemoryFaultOp, Error>();
  constructor(readonly size: number) {}

  /** The injected fault for `op`, once. */
  takeFault(op: MemoryFaultOp): Error | undefined {
    const e = this.faults.get(op);
    if (e) this.faults.delete(op);
    return e;
  }
}

/** Names of volumes `memory:NAME` resolves to (process-wide, for tests and the demo). */
const registry = new Map<string, MemoryVolume>();

/**
 * A volume in memory: a real backend (not a mock) for tests that drive the
 * layers above without files. Data lives in MEMORY_BLOCK blocks; unwritten
 * blocks are holes, a write allocates the blocks it touches, zero() drops the
 * blocks it covers whole (they become holes) and zero-fills the partial edges
 * (and a short last block), so allocated() behaves like SEEK_DATA/SEEK_HOLE
 * on a sparse file with 4 KiB blocks. Range checks and error codes are those of the file backends.
 *
 * A MemoryVolume is a handle on shared data: {@link handle} (and `memory:NAME`
 * through the factory) gives another handle with its own closed and read-only
 * flags, so a test can keep one while a mirror opens and closes its own.
 * Counters (flushes, reads) and injected faults belong to the data, not to a
 * handle.
 */
export class MemoryVolume implements Volume {
  readonly kind = 'memory' as const;
  readonly capabilities: VolumeCapabilities;
  private closed = false;

  private constructor(
    private readonly store: MemoryStore,
    readonly path: string,
    private readonly readOnly: boolean,
  ) {
    // As for the file backends: a read-only handle cannot deallocate.
    this.capabilities = { allocationMap: true, punchHole: !readOnly, zeroRange: !readOnly };
  }

  /**
   * A new, all-hole volume of `size` bytes (any non-negative integer).
   * `path` names it in error messages (default `memory`).
   *
   * @throws TmError TM_ERR_VOLUME_RANGE for a size that is not a non-negative safe integer.
   */
  static create(size: number, o: { path?: string; readOnly?: boolean } = {}): MemoryVolume {
    if (!Number.isSafeInteger(size) || size < 0) throw new TmError(ErrorCodes.VOLUME_RANGE, `memory volume size ${size} is not a non-negative integer`);
    return new MemoryVolume(new MemoryStore(size), o.path ?? 'memory', o.readOnly === true);
  }

  /**
   * Make `vol`'s data openable as `memory:NAME`. Registering the same data
   * again under the same name is a no-op.
   *
   * @throws TmError TM_ERR_INTERNAL if NAME already names another volume (unregister it first).
   */
  static register(name: string, vol: MemoryVolume): void {
    const had = registry.get(name);
    if (had && had.store !== vol.store) throw new TmError(ErrorCodes.INTERNAL, `memory volume ${name} is already registered`);
    registry.set(name, vol);
  }

  /** The volume registered as NAME, if any (open it with {@link handle}). */
  static lookup(name: string): MemoryVolume | undefined {
    return registry.get(name);
  }

  /** Forget NAME (open handles keep working). True if it was registered. */
  static unregister(name: string): boolean {
    return registry.delete(name);
  }

  /** Size in bytes. */
  get size(): number {
    return this.store.size;
  }

  /** flush() calls made on open handles of this data. */
  get flushes(): number {
    return this.store.flushes;
  }

  /** read() calls that read (passed their checks) on any handle of this data. */
  get reads(): number {
    return this.store.reads;
  }

  /**
   * Another handle on the same data, with its own closed and read-only flags
   * (default: writable). Works even if this handle is closed.
   */
  handle(o: { path?: string; readOnly?: boolean } = {}): MemoryVolume {
    return new MemoryVolume(this.store, o.path ?? this.path, o.readOnly === true);
  }

  /**
   * An independent copy of the data as it is now (a new, unregistered volume;
   * counters and faults start fresh).
   *
   * @throws TmError TM_ERR_VOLUME_IO if this handle is closed.
   */
  clone(o: { path?: string; readOnly?: boolean } = {}): MemoryVolume {
    this.check(0, 0, 'clone');
    const store = new MemoryStore(this.store.size);
    for (const [i, b] of this.store.blocks) store.blocks.set(i, Buffer.from(b));
    return new MemoryVolume(store, o.path ?? this.path, o.readOnly === true);
  }

  /**
   * Make the next read, write, zero or flush (on any handle of this data,
   * once its arguments passed their checks) reject with `err`, wrapped as the
   * file backends wrap system errors (a TmError as is; ENOSPC as
   * TM_ERR_NO_SPACE; anything else TM_ERR_VOLUME_IO with `err` as the cause).
   * Nothing is read or changed by the failing call.
   */
  failNext(op: MemoryFaultOp, err: Error): void {
    this.store.faults.set(op, err);
  }

  private check(offset: number, length: number, what: string): void {
    checkAccess(this, this.closed, offset, length, what);
  }

  private checkWritable(what: string): void {
    checkWritable(this, this.readOnly, what);
  }

  private fault(op: MemoryFaultOp, what: string): void {
    const e = this.store.takeFault(op);
    if (e) throw asTmError(e, ErrorCodes.VOLUME_IO, what);
  }

  async allocated(alignTo?: number, within?: ByteRange): Promise<ByteRange[]> {
    this.check(0, 0, 'allocation map');
    const indices = [...this.store.blocks.keys()].sort((a, b) => a - b);
    const out: ByteRange[] = [];
    for (const i of indices) {
      const start = i * MEMORY_BLOCK;
      const end = Math.min(start + MEMORY_BLOCK, this.size);
      const last = out[out.length - 1];
      if (last && last.offset + last.length === start) last.length = end - last.offset;
      else out.push({ offset: start, length: end - start });
    }
    const clipped = clipRanges(out, within);
    return alignTo ? alignRanges(clipped, alignTo, this.size) : clipped;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.check(offset, length, 'read');
    this.fault('read', `reading ${this.path} at ${offset}+${length}`);
    this.store.reads++;
    const buf = into && into.length >= length ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const i = Math.floor(pos / MEMORY_BLOCK);
      const inBlock = pos - i * MEMORY_BLOCK;
      const n = Math.min(MEMORY_BLOCK - inBlock, end - pos);
      const block = this.store.blocks.get(i);
      if (block) block.copy(buf, pos - offset, inBlock, inBlock + n);
      else buf.fill(0, pos - offset, pos - offset + n);
      pos += n;
    }
    return buf;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.check(offset, data.length, 'write');
    this.checkWritable('write');
    this.fault('write', `writing ${this.path} at ${offset}+${data.length}`);
    const end = offset + data.length;
    for (let pos = offset; pos < end; ) {
      const i = Math.floor(pos / MEMORY_BLOCK);
      const inBlock = pos - i * MEMORY_BLOCK;
      const n = Math.min(MEMORY_BLOCK - inBlock, end - pos);
      let block = this.store.blocks.get(i);
      if (!block) {
        block = Buffer.alloc(MEMORY_BLOCK);
        this.store.blocks.set(i, block);
      }
      data.copy(block, inBlock, pos - offset, pos - offset + n);
      pos += n;
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    this.check(offset, length, 'zero');
    this.checkWritable('zero');
    this.fault('zero', `zeroing ${this.path} at ${offset}+${length}`);
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const i = Math.floor(pos / MEMORY_BLOCK);
      const inBlock = pos - i * MEMORY_BLOCK;
      const n = Math.min(MEMORY_BLOCK - inBlock, end - pos);
      // Only a range covering all MEMORY_BLOCK bytes frees a block. The last
      // block of a size that is not a multiple is never whole, so zeroing it
      // keeps it allocated: what ext4 and XFS do with the tail block of a file.
      if (n === MEMORY_BLOCK) this.store.blocks.delete(i);
      else this.store.blocks.get(i)?.fill(0, inBlock, inBlock + n);
      pos += n;
    }
  }

  /** Nothing to make durable; counts the call (see {@link flushes}). A closed handle ignores it, as the file backends do. */
  async flush(): Promise<void> {
    if (this.closed) return;
    this.fault('flush', `flushing ${this.path}`);
    this.store.flushes++;
  }

  /** Close this handle (idempotent); the data stays for other handles and the registry. */
  async close(): Promise<void> {
    this.closed = true;
  }
}

/**
 * True when `a` and `b` have the same size and read the same, byte for byte
 * (holes read as zeros, so allocation may differ). Reads both in 1 MiB windows.
 */
export async function sameContent(a: Volume, b: Volume): Promise<boolean> {
  if (a.size !== b.size) return false;
  const WINDOW = 1024 * 1024;
  const bufA = Buffer.allocUnsafe(Math.min(WINDOW, a.size));
  const bufB = Buffer.allocUnsafe(Math.min(WINDOW, a.size));
  for (let pos = 0; pos < a.size; pos += WINDOW) {
    const n = Math.min(WINDOW, a.size - pos);
    const x = await a.read(pos, n, bufA);
    const y = await b.read(pos, n, bufB);
    if (!x.equals(y)) return false;
  }
  return true;
}
