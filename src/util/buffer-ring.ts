/**
 * Buffers taken from one ring and given back, mostly in the order they were
 * taken: the sender's read buffers (extents go out in ascending order) and
 * the frames a WebSocket receives (wire/transport.ts). Reusing the same
 * memory instead of a fresh Buffer per piece spares the page faults of new
 * memory and the major GCs that churn of 1 MiB external buffers drives (V8
 * runs one per 64 MiB of external memory allocated).
 *
 * A piece that does not fit (the ring is full, or larger than the ring) gets a
 * fresh Buffer, so `take` never waits; `release` of such a buffer is a no-op.
 * A buffer given back out of order frees its room once those taken before it
 * are back too; one never given back leaves the ring to fresh Buffers.
 */
export class BufferRing {
  private readonly buf: Buffer;
  /** Live regions, oldest first. */
  private readonly live: { start: number; buf: Buffer }[] = [];
  private tail = 0;

  constructor(readonly capacity: number) {
    this.buf = Buffer.allocUnsafeSlow(capacity);
  }

  /** A buffer of `length` bytes, from the ring when it fits. */
  take(length: number): Buffer {
    const start = this.place(length);
    if (start < 0) return Buffer.allocUnsafe(length);
    const b = this.buf.subarray(start, start + length);
    this.live.push({ start, buf: b });
    this.tail = start + length;
    return b;
  }

  /** Whether `b` is (a view of) this ring's memory. */
  owns(b: Uint8Array): boolean {
    return b.buffer === this.buf.buffer;
  }

  /** Give back the oldest buffer taken (`b` is checked: a buffer not from the ring is ignored). */
  release(b: Buffer): void {
    const first = this.live[0];
    if (first && first.buf === b) this.live.shift();
    else {
      const i = this.live.findIndex((r) => r.buf === b);
      if (i < 0) return;
      this.live.splice(i, 1);
    }
    if (this.live.length === 0) this.tail = 0;
  }

  /** Start of a free region of `length` bytes, -1 when none. */
  private place(length: number): number {
    if (length > this.capacity) return -1;
    if (this.live.length === 0) return 0;
    const head = this.live[0]!.start;
    if (this.tail > head) {
      // Not wrapped: free space is [tail, capacity) and [0, head).
      if (this.capacity - this.tail >= length) return this.tail;
      return head >= length ? 0 : -1;
    }
    // Wrapped (tail <= head; equal: full): free space is [tail, head).
    return head - this.tail >= length ? this.tail : -1;
  }
}
