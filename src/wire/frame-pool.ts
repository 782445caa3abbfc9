/**
 * Buffers for outgoing frames, reused once the channel is done with them (a
 * socket's write has handed the bytes to the kernel). Sending a data extent
 * otherwise allocates a new Buffer of about a megabyte per frame: memory
 * outside V8's heap that it accounts for, and that churn alone set off a major
 * GC every few dozen megabytes sent (about an eighth of the primary's CPU in
 * the profile of an initial sync on loopback, issue 13 §3).
 *
 * Sizes are rounded up to a multiple of {@link FRAME_POOL_GRAIN}; free
 * buffers are kept per size up to {@link FRAME_POOL_BYTES} in all. A buffer
 * never given back (a channel that does not report its writes, a session that
 * ended) is simply left to the GC.
 */
export const FRAME_POOL_GRAIN = 64 * 1024;
export const FRAME_POOL_BYTES = 32 * 1024 * 1024;

export class FramePool {
  private readonly free = new Map<number, Buffer[]>();
  private freeBytes = 0;

  constructor(private readonly maxFreeBytes = FRAME_POOL_BYTES) {}

  /** A buffer of at least `length` bytes (its length is the size class). */
  take(length: number): Buffer {
    const size = Math.ceil(length / FRAME_POOL_GRAIN) * FRAME_POOL_GRAIN;
    const b = this.free.get(size)?.pop();
    if (b) {
      this.freeBytes -= size;
      return b;
    }
    return Buffer.allocUnsafeSlow(size);
  }

  /** Give back a buffer from {@link take}, no longer used by anyone. */
  give(b: Buffer): void {
    if (this.freeBytes + b.length > this.maxFreeBytes) return;
    let list = this.free.get(b.length);
    if (!list) this.free.set(b.length, (list = []));
    list.push(b);
    this.freeBytes += b.length;
  }

  /** Bytes held in free buffers. */
  get held(): number {
    return this.freeBytes;
  }
}
