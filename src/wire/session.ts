import { EventEmitter } from 'node:events';
import { ErrorCodes, TmError, type ErrorCode } from '../errors.js';
import type { FrameChannel } from './channel.js';
import { decode, encode } from './codec.js';
import { CloseCodes, type DecodeContext, type Message } from './messages.js';

const KNOWN_CODES = new Set<string>(Object.values(ErrorCodes));

/** Bytes counted on one session, both ways, as frames on the channel. */
export interface SessionCounters {
  framesOut: number;
  bytesOut: number;
  framesIn: number;
  bytesIn: number;
}

/**
 * One channel (a WebSocket, see transport.ts; or memory.ts in tests) carrying
 * one mirror. Decodes and validates every frame before it
 * is handed out; a violation ends the session with an error frame and a coded
 * close, reported once through {@link Session.closed}. Received messages queue
 * until {@link Session.next} takes them; the channel is paused while more than
 * `maxQueued` messages wait, so a slow consumer bounds memory.
 */
export class Session extends EventEmitter {
  readonly ctx: DecodeContext = {};
  readonly counters: SessionCounters = { framesOut: 0, bytesOut: 0, framesIn: 0, bytesIn: 0 };
  /** Resolves with the error that ended the session (or null for a normal close). */
  readonly closed: Promise<TmError | null>;
  private queue: Message[] = [];
  private waiter: { resolve: (m: Message) => void; reject: (e: TmError) => void } | null = null;
  private failure: TmError | null = null;
  private ended = false;
  private paused = false;
  private resolveClosed!: (e: TmError | null) => void;

  constructor(
    readonly channel: FrameChannel,
    readonly peerName: string,
    private readonly maxQueued = 64,
  ) {
    super();
    this.closed = new Promise((r) => (this.resolveClosed = r));
    channel.attach({
      frame: (data, isBinary) => this.onFrame(data, isBinary),
      close: (code, reason) => this.onClose(code, reason),
      error: (err) => {
        this.end(new TmError(ErrorCodes.CONNECTION, `connection to ${this.peerName} failed: ${err.message}`, { cause: err }));
      },
    });
  }

  /** Encode and send; returns the frame size in bytes. */
  send(msg: Message): number {
    if (this.ended) throw this.failure ?? new TmError(ErrorCodes.CONNECTION, `session with ${this.peerName} is closed`);
    const frame = encode(msg);
    this.channel.send(frame);
    this.counters.framesOut++;
    this.counters.bytesOut += frame.length;
    return frame.length;
  }

  /** Bytes queued in the channel and not yet handed on (to the kernel, for a socket). */
  get bufferedAmount(): number {
    return this.channel.bufferedAmount;
  }

  get isOpen(): boolean {
    return !this.ended;
  }

  /** Next message; rejects with the session's error once it has ended. */
  next(timeoutMs?: number): Promise<Message> {
    const m = this.queue.shift();
    if (m) {
      this.maybeResume();
      return Promise.resolve(m);
    }
    if (this.ended) return Promise.reject(this.failure ?? new TmError(ErrorCodes.CONNECTION, `session with ${this.peerName} closed`));
    return new Promise<Message>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.waiter = null;
          const err = new TmError(ErrorCodes.TIMEOUT, `${this.peerName} did not answer within ${timeoutMs} ms`);
          this.fail(err);
          reject(err);
        }, timeoutMs);
      }
      this.waiter = {
        resolve: (msg) => {
          if (timer) clearTimeout(timer);
          resolve(msg);
        },
        reject: (e) => {
          if (timer) clearTimeout(timer);
          reject(e);
        },
      };
    });
  }

  /**
   * End the session because of `err`: tell the peer (error frame + close code)
   * and fail every waiter. Idempotent: only the first error counts.
   */
  fail(err: TmError, closeCode: number = CloseCodes.PROTOCOL): void {
    if (this.ended) return;
    try {
      if (this.channel.isOpen) {
        this.channel.send(encode({ type: 'error', code: err.code, message: err.message.slice(0, 1000) }));
        this.channel.close(closeCode, err.code);
      }
    } catch {
      // the socket may already be gone; the peer learns from the close
    }
    this.end(err);
    // Give the close handshake a moment, then make sure the socket is gone.
    setTimeout(() => this.channel.terminate(), 2000).unref();
  }

  /** Normal end: close code 1000. Idempotent. */
  close(): void {
    if (this.ended) return;
    this.end(null);
    this.closeChannel(CloseCodes.NORMAL, 'bye');
  }

  /** Start the close handshake, and terminate the connection if it has not ended after a short grace period. */
  private closeChannel(code: number, reason: string): void {
    try {
      this.channel.close(code, reason);
    } catch {
      // already closed
    }
    setTimeout(() => this.channel.terminate(), 2000).unref();
  }

  /** Abort at once without telling the peer anything. */
  destroy(err?: TmError): void {
    this.end(err ?? new TmError(ErrorCodes.ABORTED, `session with ${this.peerName} aborted`));
    this.channel.terminate();
  }

  private onFrame(frame: Buffer, isBinary: boolean): void {
    if (this.ended) return;
    this.counters.framesIn++;
    this.counters.bytesIn += frame.length;
    if (!isBinary) {
      this.fail(new TmError(ErrorCodes.PROTOCOL, `${this.peerName} sent a text frame; the protocol uses binary frames only`));
      return;
    }
    let msg: Message;
    try {
      msg = decode(frame, this.ctx);
    } catch (e) {
      const err = e instanceof TmError ? e : new TmError(ErrorCodes.PROTOCOL, `bad frame from ${this.peerName}: ${(e as Error).message}`);
      this.fail(new TmError(err.code, `from ${this.peerName}: ${err.message}`));
      return;
    }
    if (msg.type === 'error') {
      const code = (KNOWN_CODES.has(msg.code) ? msg.code : ErrorCodes.PEER) as ErrorCode;
      this.end(new TmError(code, `${this.peerName} ended the session: ${msg.message}`));
      // The peer said it is done: our side of the connection goes too, whether
      // or not the peer closes it (one that never does must not hold a socket).
      this.closeChannel(CloseCodes.NORMAL, 'peer error');
      return;
    }
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve(msg);
      return;
    }
    this.queue.push(msg);
    if (!this.paused && this.queue.length >= this.maxQueued) {
      this.paused = true;
      this.channel.pause();
    }
  }

  private maybeResume(): void {
    if (this.paused && this.queue.length < this.maxQueued / 2) {
      this.paused = false;
      this.channel.resume();
    }
  }

  private onClose(code: number, reason: string): void {
    if (this.ended) return;
    if (code === CloseCodes.NORMAL) this.end(new TmError(ErrorCodes.CONNECTION, `${this.peerName} closed the session`));
    else this.end(new TmError(ErrorCodes.CONNECTION, `connection to ${this.peerName} closed (code ${code}${reason ? `, ${reason}` : ''})`));
  }

  private end(err: TmError | null): void {
    if (this.ended) return;
    this.ended = true;
    this.failure = err;
    // Queued messages stay readable; a waiter only exists when the queue is empty.
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(err ?? new TmError(ErrorCodes.CONNECTION, `session with ${this.peerName} closed`));
    }
    this.resolveClosed(err);
    this.emit('end', err);
  }
}
