/**
 * One run of an async job at a time, later requests coalesced: a request made
 * while a run is going starts exactly one more run after it (never two
 * concurrent, never a request forgotten). Used for checkpoints, where only the
 * latest state needs to reach the disk.
 */
export class Coalesced {
  private running: Promise<void> | null = null;
  private again = false;
  private failure: unknown = null;

  /** `job` persists whatever is current when it runs; `onError` hears of a failed run (the first one only). */
  constructor(
    private readonly job: () => Promise<void>,
    private readonly onError: (e: unknown) => void = () => {},
  ) {}

  /** Ask for a run; returns at once. After a failure, requests are ignored. */
  request(): void {
    if (this.failure !== null) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = (async () => {
      do {
        this.again = false;
        await this.job();
      } while (this.again);
    })()
      .catch((e) => {
        this.failure = e;
        this.onError(e);
      })
      .finally(() => (this.running = null));
  }

  /** Resolves when no run is going (requests made meanwhile included); rejects with a run's failure. */
  async settled(): Promise<void> {
    while (this.running) await this.running;
    if (this.failure !== null) throw this.failure;
  }

  /** A run's failure, or null. */
  get error(): unknown {
    return this.failure;
  }

  get busy(): boolean {
    return this.running !== null;
  }
}
