import { ErrorCodes, TmError } from '../errors.js';
import { sleep as defaultSleep } from '../util/sleep.js';

/** Clock and timer of a {@link TokenBucket}; injected by tests (a fake clock), real ones by default. */
export interface TokenBucketOptions {
  /** Monotonic milliseconds. Default: `performance.now()`. */
  now?: () => number;
  /**
   * Wait `ms` milliseconds; may resolve early when `signal` aborts (it must not
   * hang after an abort). Default: util/sleep.
   */
  sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
}

/** A bandwidth cap: `rate` bytes per second, bursts of up to `burst` bytes. */
export interface BandwidthLimit {
  rate: number;
  burst?: number;
}

/** Smallest default burst: 64 KiB, so a low cap does not cut frames into many tiny waits. */
export const MIN_DEFAULT_BURST = 64 * 1024;

/**
 * The burst used when none is configured: a quarter of a second of traffic at
 * `rate`, and at least {@link MIN_DEFAULT_BURST}. Short enough that a cap holds
 * over any second (at most rate + rate/4 in the first second after idling),
 * long enough that chunk-sized frames rarely wait at a high rate.
 */
export function defaultBurst(rate: number): number {
  return Math.max(Math.ceil(rate / 4), MIN_DEFAULT_BURST);
}

interface Waiter {
  bytes: number;
  resolve: () => void;
  reject: (e: TmError) => void;
  cleanup: () => void;
}

function validate(rate: number, burst: number): void {
  if (!Number.isFinite(rate) || rate <= 0) {
    throw new TmError(ErrorCodes.CONFIG, `invalid bandwidth rate ${rate}: expected a positive number of bytes per second`);
  }
  if (!Number.isFinite(burst) || burst <= 0) {
    throw new TmError(ErrorCodes.CONFIG, `invalid bandwidth burst ${burst}: expected a positive number of bytes`);
  }
}

function abortError(signal: AbortSignal): TmError {
  const reason: unknown = signal.reason;
  const why = reason instanceof Error ? `: ${reason.message}` : '';
  return new TmError(ErrorCodes.ABORTED, `bandwidth wait aborted${why}`, { cause: reason });
}

/**
 * A token bucket: tokens accrue at `rate` bytes per second up to `burst`, and
 * {@link take} spends them. Over any interval of t seconds it admits at most
 * `rate * t + burst` bytes.
 *
 * - Waiters are served strictly in arrival order (FIFO): a later small request
 *   never overtakes an earlier large one, so mirrors sharing a bucket get equal
 *   turns and none starves.
 * - A request larger than `burst` is allowed: while it is first in line the
 *   bucket may fill up to its size, so it waits `bytes / rate` from empty, as
 *   if it were sent at the rate. The bucket never goes into debt.
 * - A waiter can be aborted with an AbortSignal; it rejects with
 *   TM_ERR_ABORTED, takes nothing, and the next waiter moves up.
 */
export class TokenBucket {
  private tokens: number;
  private last: number;
  private readonly queue: Waiter[] = [];
  private pumping = false;
  /** Wakes the pump early when the head of the queue or the rate changes. */
  private wake: AbortController | null = null;
  private readonly now: () => number;
  private readonly sleep: (ms: number, signal?: AbortSignal) => Promise<void>;
  private rate_: number;
  private burst_: number;
  /** Bytes admitted since construction (for status and tests). */
  admitted = 0;

  constructor(rate: number, burst: number = defaultBurst(rate), opts: TokenBucketOptions = {}) {
    validate(rate, burst);
    this.rate_ = rate;
    this.burst_ = burst;
    this.now = opts.now ?? (() => performance.now());
    this.sleep = opts.sleep ?? defaultSleep;
    this.tokens = burst; // start full
    this.last = this.now();
  }

  get rate(): number {
    return this.rate_;
  }

  get burst(): number {
    return this.burst_;
  }

  /** Requests waiting their turn. */
  get waiting(): number {
    return this.queue.length;
  }

  /** Tokens available right now (bytes that could go at once with nobody waiting). */
  get available(): number {
    this.refill();
    return this.tokens;
  }

  /**
   * Wait until `bytes` may be sent, then spend them. Resolves at once when
   * nobody waits and enough tokens are there; otherwise queues (FIFO). Rejects
   * with TM_ERR_ABORTED when `signal` aborts first (nothing is spent).
   */
  take(bytes: number, signal?: AbortSignal): Promise<void> {
    if (!Number.isFinite(bytes) || bytes < 0) {
      return Promise.reject(new TmError(ErrorCodes.INTERNAL, `bandwidth: invalid byte count ${bytes}`));
    }
    if (signal?.aborted) return Promise.reject(abortError(signal));
    if (bytes === 0) return Promise.resolve();
    this.refill();
    if (this.queue.length === 0 && this.tokens >= bytes) {
      this.tokens -= bytes;
      this.admitted += bytes;
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      const onAbort = () => {
        const i = this.queue.indexOf(waiter);
        if (i < 0) return;
        this.refill(); // account the time spent with this waiter at the head (its cap)
        this.queue.splice(i, 1);
        if (i === 0) this.wake?.abort(); // the next waiter's turn: re-plan
        reject(abortError(signal!));
      };
      const waiter: Waiter = {
        bytes,
        resolve,
        reject,
        cleanup: () => signal?.removeEventListener('abort', onAbort),
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.queue.push(waiter);
      this.pump();
    });
  }

  /**
   * Give back tokens taken for bytes that were never sent (a later limit in
   * {@link throttle} was aborted). Never above the cap.
   */
  refund(bytes: number): void {
    if (!(bytes > 0)) return;
    this.refill();
    this.tokens = Math.min(this.cap(), this.tokens + bytes);
    this.admitted = Math.max(0, this.admitted - bytes);
    if (this.queue.length > 0) this.wake?.abort();
  }

  /** Change the limit (configuration reload). Tokens above the new cap are dropped. */
  setRate(rate: number, burst: number = defaultBurst(rate)): void {
    validate(rate, burst);
    this.refill();
    this.rate_ = rate;
    this.burst_ = burst;
    this.tokens = Math.min(this.tokens, this.cap());
    this.wake?.abort();
  }

  /** The most tokens the bucket holds now: the burst, or the size of a larger request first in line. */
  private cap(): number {
    const head = this.queue[0];
    return head ? Math.max(this.burst_, head.bytes) : this.burst_;
  }

  /**
   * Add the tokens accrued since the last refill. Called before every change of
   * the queue's head, so the cap that applied over the interval is the current one.
   */
  private refill(): void {
    const t = this.now();
    const elapsed = t - this.last;
    this.last = t;
    if (elapsed > 0) this.tokens = Math.min(this.cap(), this.tokens + (elapsed * this.rate_) / 1000);
    else this.tokens = Math.min(this.cap(), this.tokens);
  }

  /** Serve the queue in order; one pump at a time, sleeping until the head can go. */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    void this.run().finally(() => {
      this.pumping = false;
      if (this.queue.length > 0) this.pump(); // a waiter queued while the loop was exiting
    });
  }

  private async run(): Promise<void> {
    for (;;) {
      const head = this.queue[0];
      if (!head) return;
      this.refill();
      if (this.tokens >= head.bytes) {
        this.tokens -= head.bytes;
        this.admitted += head.bytes;
        this.queue.shift();
        this.refill(); // the next head's cap applies from now on
        head.cleanup();
        head.resolve();
        continue;
      }
      const ms = Math.max(1, Math.ceil(((head.bytes - this.tokens) * 1000) / this.rate_));
      const wake = new AbortController();
      this.wake = wake;
      try {
        await this.sleep(ms, wake.signal);
      } catch {
        // an injected sleep that rejects on abort: same as waking early
      } finally {
        if (this.wake === wake) this.wake = null;
      }
    }
  }
}

/**
 * Take `bytes` from every bucket in order (typically the mirror's own, then the
 * one shared by every mirror to the same peer). Undefined entries are no limit.
 * When aborted part way, the tokens already taken are given back.
 */
export async function throttle(buckets: readonly (TokenBucket | undefined)[], bytes: number, signal?: AbortSignal): Promise<void> {
  const taken: TokenBucket[] = [];
  try {
    for (const b of buckets) {
      if (!b) continue;
      await b.take(bytes, signal);
      taken.push(b);
    }
  } catch (e) {
    for (const b of taken) b.refund(bytes);
    throw e;
  }
}

/**
 * Hands out token buckets: one per peer key (shared by every mirror to that
 * peer) and one per mirror. Asking again for the same key returns the same
 * bucket; a different limit updates it in place (the last configuration
 * wins). No limit means no bucket (undefined); an existing bucket is only
 * dropped by {@link forgetMirror} / {@link forgetPeer}, since other mirrors may
 * still hold it.
 */
export class BandwidthRegistry {
  private readonly peers = new Map<string, TokenBucket>();
  private readonly mirrors = new Map<string, TokenBucket>();

  constructor(private readonly opts: TokenBucketOptions = {}) {}

  /** The bucket shared by every mirror to `key` (e.g. the peer URL's host:port), or undefined without a limit. */
  peer(key: string, limit: BandwidthLimit | undefined): TokenBucket | undefined {
    return this.get(this.peers, key, limit);
  }

  /** The bucket of one mirror, or undefined without a limit. */
  mirror(name: string, limit: BandwidthLimit | undefined): TokenBucket | undefined {
    return this.get(this.mirrors, name, limit);
  }

  /** The buckets a mirror's sends go through, mirror first: pass them to {@link throttle}. */
  bucketsFor(o: { mirror: string; mirrorLimit?: BandwidthLimit; peer: string; peerLimit?: BandwidthLimit }): TokenBucket[] {
    const out: TokenBucket[] = [];
    const m = this.mirror(o.mirror, o.mirrorLimit);
    if (m) out.push(m);
    const p = this.peer(o.peer, o.peerLimit);
    if (p) out.push(p);
    return out;
  }

  /** Forget a mirror's bucket (the mirror was removed). */
  forgetMirror(name: string): void {
    this.mirrors.delete(name);
  }

  /** Forget a peer's bucket (no mirror uses that peer any more). */
  forgetPeer(key: string): void {
    this.peers.delete(key);
  }

  private get(map: Map<string, TokenBucket>, key: string, limit: BandwidthLimit | undefined): TokenBucket | undefined {
    if (!limit) return undefined;
    const burst = limit.burst ?? defaultBurst(limit.rate);
    const have = map.get(key);
    if (have) {
      if (have.rate !== limit.rate || have.burst !== burst) have.setRate(limit.rate, burst);
      return have;
    }
    const b = new TokenBucket(limit.rate, burst, this.opts);
    map.set(key, b);
    return b;
  }
}
