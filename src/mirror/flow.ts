import { TmError } from '../errors.js';

/**
 * Flow control for one generation: frames sent and not yet acknowledged are
 * held as credit; the sender waits while `maxInFlight` bytes are out. Entries
 * are acknowledged in order by seq (the secondary applies in order). A frame
 * may carry a tag, handed back by the ack that covers it (the sender's
 * compression measurements).
 */
export class FlowControl<T = never> {
  private readonly entries: { seq: number; bytes: number; end: number; tag: T | undefined }[] = [];
  private head = 0;
  private inFlight = 0;
  private waiter: { resolve: () => void; reject: (e: TmError) => void } | null = null;
  private failure: TmError | null = null;
  /** End offset (bytes) of the last acknowledged extent. */
  ackedEnd = 0;

  constructor(private readonly maxInFlight: number) {}

  get bytesInFlight(): number {
    return this.inFlight;
  }

  /** Resolves when another frame may be sent (rejects once the flow has failed). */
  async ready(): Promise<void> {
    if (this.failure) throw this.failure;
    if (this.inFlight < this.maxInFlight) return;
    await new Promise<void>((resolve, reject) => (this.waiter = { resolve, reject }));
  }

  sent(seq: number, bytes: number, end: number, tag?: T): void {
    this.entries.push({ seq, bytes, end, tag });
    this.inFlight += bytes;
  }

  /** Every frame up to `seq` is acknowledged; returns the tags they were sent with, in order. */
  acked(seq: number): T[] {
    const tags: T[] = [];
    while (this.head < this.entries.length && this.entries[this.head]!.seq <= seq) {
      const e = this.entries[this.head++]!;
      this.inFlight -= e.bytes;
      this.ackedEnd = e.end;
      if (e.tag !== undefined) tags.push(e.tag);
    }
    if (this.head > 1024 && this.head * 2 > this.entries.length) {
      this.entries.splice(0, this.head);
      this.head = 0;
    }
    if (this.waiter && this.inFlight < this.maxInFlight) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve();
    }
    return tags;
  }

  /** Everything sent has been acknowledged. */
  get drained(): boolean {
    return this.head >= this.entries.length;
  }

  fail(err: TmError): void {
    if (this.failure) return;
    this.failure = err;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(err);
    }
  }
}
