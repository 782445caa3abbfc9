import { EventEmitter } from 'node:events';
import { ErrorCodes, TmError, type ErrorCode } from '../errors.js';
import { FrameMac, TAG_BYTES } from './auth.js';
import { FRAME_TOO_LARGE, type FrameChannel } from './channel.js';
import { decode, encode, encodeParts } from './codec.js';
import { CloseCodes, MAX_HANDSHAKE_FRAME_BYTES, type DecodeContext, type Message } from './messages.js';

const KNOWN_CODES = new Set<string>(Object.values(ErrorCodes));

/**
 * How long an ended session waits for the close handshake before it terminates
 * the connection, ms: whatever ended it, and whatever the peer does, the
 * socket is gone by then.
 */
export const CLOSE_GRACE_MS = 2000;

/** Frames a peer may send past the handshake's plain ones before the key is known (a correct peer sends none). */
const MAX_HELD_FRAMES = 4;

/** The side of a session: the MAC's direction byte is the sender's (auth.ts). */
export type SessionRole = 'primary' | 'secondary';

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
 *
 * The handshake (handshake.ts) drives two more states: from
 * {@link Session.beginHandshake} only handshake-sized frames are accepted, and
 * from {@link Session.protect} every frame either way carries a MAC with an
 * implicit sequence number, verified before the frame is decoded. Whatever
 * ends a session, its connection is closed, terminated after CLOSE_GRACE_MS at
 * the latest.
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
  private terminateTimer: NodeJS.Timeout | null = null;
  /** The channel reported its close: the connection is gone. */
  private closedChannel = false;
  /** Inbound frames received so far (the next one's number, from 0). */
  private inIndex = 0;
  /** Inbound frames numbered below this travel without a MAC; Infinity until the handshake begins (sessions of tests without one). */
  private plainInbound = Infinity;
  /** Between beginHandshake() and protect(): frames above MAX_HANDSHAKE_FRAME_BYTES are refused undecoded. */
  private preAuth = false;
  /** Frames that arrived past the plain ones before the key was known: verified by protect(). */
  private held: Buffer[] = [];
  /** Data extents handed out as views of the channel's reused memory, and the frame to give back ({@link release}). */
  private readonly lent = new WeakMap<Message, Buffer>();
  /** Set by protect(): the session key and the frame counters of both directions (auth.ts). */
  private mac: { key: FrameMac; self: SessionRole; peer: SessionRole; sendSeq: number; recvSeq: number } | null = null;

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
        if ((err as NodeJS.ErrnoException).code === FRAME_TOO_LARGE) {
          // Refused by the channel from the frame's header (it has sent its close
          // frame, 1009): nothing of it was read, and nothing more will be. The
          // connection is held, unread, for the grace period like any other that
          // ended: an attacker that waits for the close cannot come back at once.
          setImmediate(() => this.channel.pause());
          return this.end(this.mac ? new TmError(ErrorCodes.PROTOCOL, `${this.peerName} sent a frame over the size limit (${err.message})`, { cause: err }) : this.preAuthTooLarge(null, err));
        }
        this.end(new TmError(ErrorCodes.CONNECTION, `connection to ${this.peerName} failed: ${err.message}`, { cause: err }));
      },
    });
  }

  /**
   * Encode and send (with its MAC once {@link protect} has run); returns the
   * frame size in bytes. A data extent's payload goes to the socket without a
   * copy: it must stay unchanged until `written` is called (the socket has
   * taken the frame, or dropped it because the connection is gone).
   */
  send(msg: Message, written?: () => void): number {
    if (this.ended) throw this.failure ?? new TmError(ErrorCodes.CONNECTION, `session with ${this.peerName} is closed`);
    const n = this.sendFrame(encodeParts(msg), written);
    this.counters.framesOut++;
    this.counters.bytesOut += n;
    return n;
  }

  /**
   * Send bytes already encoded, unchecked by the codec (with their MAC once
   * {@link protect} has run): what a peer that does not follow the codec can
   * put on the wire after authentication; the tests of a malicious peer use it.
   */
  sendEncoded(body: Buffer): number {
    if (this.ended) throw this.failure ?? new TmError(ErrorCodes.CONNECTION, `session with ${this.peerName} is closed`);
    return this.sendFrame([body]);
  }

  /** One frame of one or two parts (head, payload), its tag appended as a third. */
  private sendFrame(parts: [Buffer] | [Buffer, Buffer], written?: () => void): number {
    const m = this.mac;
    const length = parts.length === 1 ? parts[0].length : parts[0].length + parts[1].length;
    if (!m) {
      this.channel.send(parts, written);
      return length;
    }
    this.channel.send([...parts, m.key.tag(m.self, m.sendSeq++, parts[0], parts[1])], written);
    return length + TAG_BYTES;
  }

  /**
   * The handshake starts (handshake.ts): until {@link protect}, a frame larger
   * than MAX_HANDSHAKE_FRAME_BYTES ends the session before it is decoded
   * (TM_ERR_PREAUTH_LIMIT), and inbound frames numbered `plainFrames` and up
   * (the session's first frame is 0) must carry a MAC: those that arrive before
   * the key is known wait, undecoded, for protect() to verify them. Fixing the
   * count rather than switching at protect() time means no frame a relay slips
   * in behind the last handshake frame is ever decoded without its MAC.
   */
  beginHandshake(plainFrames: number): void {
    this.preAuth = !this.mac;
    this.plainInbound = plainFrames;
    if (this.inIndex > plainFrames) {
      this.fail(new TmError(ErrorCodes.PROTOCOL, `${this.peerName} sent ${this.inIndex} frames before the handshake, which allows ${plainFrames}`));
    }
  }

  /**
   * The peer has proven the key: from now on every frame either way carries a
   * MAC under `key` (auth.ts), the frame size limit of the handshake is lifted,
   * and 'authenticated' is emitted. A frame whose MAC does not verify ends the
   * session with TM_ERR_FRAME_AUTH before anything of it is decoded.
   */
  protect(key: Buffer, self: SessionRole): void {
    if (this.mac) throw new TmError(ErrorCodes.INTERNAL, `session with ${this.peerName} is already protected`);
    this.mac = { key: new FrameMac(key), self, peer: self === 'primary' ? 'secondary' : 'primary', sendSeq: 0, recvSeq: 0 };
    this.preAuth = false;
    if (this.ended) return;
    this.channel.liftFrameLimit?.();
    this.emit('authenticated');
    const held = this.held;
    this.held = [];
    for (const frame of held) {
      if (this.ended) break;
      this.receiveProtected(frame);
    }
  }

  /** The peer has proven the key (see {@link protect}). */
  get authenticated(): boolean {
    return this.mac !== null;
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
        this.sendFrame([encode({ type: 'error', code: err.code, message: err.message.slice(0, 1000) })]);
        this.channel.close(closeCode, err.code);
      }
    } catch {
      // the socket may already be gone; the peer learns from the close
    }
    this.end(err);
  }

  /** Normal end: close code 1000. Idempotent. */
  close(): void {
    if (this.ended) return;
    this.end(null);
    this.closeChannel(CloseCodes.NORMAL, 'bye');
  }

  /** Start the close handshake (end() has made sure the connection is terminated if it does not finish). */
  private closeChannel(code: number, reason: string): void {
    try {
      this.channel.close(code, reason);
    } catch {
      // already closed
    }
  }

  /** Abort at once without telling the peer anything. */
  destroy(err?: TmError): void {
    this.end(err ?? new TmError(ErrorCodes.ABORTED, `session with ${this.peerName} aborted`));
    this.channel.terminate();
  }

  /**
   * Give back the frame behind a data extent this session handed out, once
   * its payload is no longer used (the target write is done): the channel
   * may receive frames into memory it reuses (transport.ts). Anything else is
   * ignored; a message never given back only costs the channel its reuse.
   */
  release(msg: Message): void {
    const frame = this.lent.get(msg);
    if (!frame) return;
    this.lent.delete(msg);
    this.channel.release?.(frame);
  }

  private onFrame(frame: Buffer, isBinary: boolean): void {
    if (!this.channel.owns?.(frame)) {
      this.receive(frame, isBinary, null);
      return;
    }
    // In the channel's reused memory: given back as soon as nothing can use it,
    // unless it became a data extent (the consumer gives it back through release()).
    let lent = false;
    try {
      lent = this.receive(frame, isBinary, frame);
    } finally {
      if (!lent) this.channel.release?.(frame);
    }
  }

  /**
   * Handles one frame; `owner`: the frame itself when it lives in the
   * channel's reused memory (else null). True when it was handed out as a
   * data extent whose payload is a view of that memory.
   */
  private receive(frame: Buffer, isBinary: boolean, owner: Buffer | null): boolean {
    if (this.ended) return false;
    this.counters.framesIn++;
    this.counters.bytesIn += frame.length;
    if (!isBinary) {
      this.fail(new TmError(ErrorCodes.PROTOCOL, `${this.peerName} sent a text frame; the protocol uses binary frames only`));
      return false;
    }
    // Before the key is proven, nothing but a handshake-sized frame is even looked at.
    if (this.preAuth && frame.length > MAX_HANDSHAKE_FRAME_BYTES) {
      this.fail(this.preAuthTooLarge(frame.length));
      return false;
    }
    const index = this.inIndex++;
    if (index < this.plainInbound) return this.handle(frame, owner);
    if (this.mac) return this.receiveProtected(frame, owner);
    // Before protect(): the channel's memory is never lent this early (frames are handshake-sized).
    this.held.push(owner ? Buffer.from(frame) : frame);
    if (this.held.length > MAX_HELD_FRAMES) {
      this.fail(new TmError(ErrorCodes.PROTOCOL, `${this.peerName} sent ${this.held.length} frames past the handshake before proving the key`));
    }
    return false;
  }

  private preAuthTooLarge(bytes: number | null, cause?: Error): TmError {
    const size = bytes === null ? 'a frame larger than' : `a frame of ${bytes} bytes, more than`;
    return new TmError(
      ErrorCodes.PREAUTH_LIMIT,
      `${this.peerName} sent ${size} the ${MAX_HANDSHAKE_FRAME_BYTES} bytes allowed before it has proven the key; refused without decoding it`,
      cause ? { cause } : undefined,
    );
  }

  /** A frame after the handshake: its tag checked under the next sequence number, then handled without it. */
  private receiveProtected(frame: Buffer, owner: Buffer | null = null): boolean {
    const m = this.mac!;
    const seq = m.recvSeq++;
    const body = frame.subarray(0, Math.max(0, frame.length - TAG_BYTES));
    if (frame.length < TAG_BYTES || !m.key.verify(m.peer, seq, body, frame.subarray(body.length))) {
      this.fail(
        new TmError(
          ErrorCodes.FRAME_AUTH,
          `frame ${seq} from ${this.peerName} (${frame.length} bytes) failed its integrity check: it was modified, replayed, reordered or injected, or one before it was dropped; nothing of it was used`,
        ),
      );
      return false;
    }
    return this.handle(body, owner);
  }

  /**
   * A frame that passed the checks above: decoded, validated, handed out.
   * `owner`: the channel's reused memory the frame is a view of (else null).
   * Only a data extent is handed out as a view of it (true: lent until
   * {@link release}); any other message is decoded again from a copy, so
   * that nothing else ever holds a view of memory the channel reuses.
   */
  private handle(frame: Buffer, owner: Buffer | null): boolean {
    let msg: Message;
    let lent = false;
    try {
      msg = decode(frame, this.ctx);
      if (owner && msg.type === 'extent' && msg.kind === 'data') {
        this.lent.set(msg, owner);
        lent = true;
      } else if (owner) {
        msg = decode(Buffer.from(frame), this.ctx);
      }
    } catch (e) {
      const err = e instanceof TmError ? e : new TmError(ErrorCodes.PROTOCOL, `bad frame from ${this.peerName}: ${(e as Error).message}`);
      this.fail(new TmError(err.code, `from ${this.peerName}: ${err.message}`));
      return false;
    }
    if (msg.type === 'error') {
      const code = (KNOWN_CODES.has(msg.code) ? msg.code : ErrorCodes.PEER) as ErrorCode;
      this.end(new TmError(code, `${this.peerName} ended the session: ${msg.message}`));
      // The peer said it is done: our side of the connection goes too, whether
      // or not the peer closes it (one that never does must not hold a socket).
      this.closeChannel(CloseCodes.NORMAL, 'peer error');
      return false;
    }
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve(msg);
      return lent;
    }
    this.queue.push(msg);
    if (!this.paused && this.queue.length >= this.maxQueued) {
      this.paused = true;
      this.channel.pause();
    }
    return lent;
  }

  private maybeResume(): void {
    if (this.paused && this.queue.length < this.maxQueued / 2) {
      this.paused = false;
      this.channel.resume();
    }
  }

  private onClose(code: number, reason: string): void {
    // The connection is gone: nothing left to terminate.
    if (this.terminateTimer) clearTimeout(this.terminateTimer);
    this.terminateTimer = null;
    this.closedChannel = true;
    if (this.ended) return;
    if (code === CloseCodes.NORMAL) this.end(new TmError(ErrorCodes.CONNECTION, `${this.peerName} closed the session`));
    else this.end(new TmError(ErrorCodes.CONNECTION, `connection to ${this.peerName} closed (code ${code}${reason ? `, ${reason}` : ''})`));
  }

  private end(err: TmError | null): void {
    if (this.ended) return;
    this.ended = true;
    this.failure = err;
    this.held = [];
    // Whatever ended the session, its connection goes: after the close
    // handshake, or terminated once the grace period is over.
    if (!this.closedChannel) {
      this.terminateTimer = setTimeout(() => {
        this.terminateTimer = null;
        this.channel.terminate();
      }, CLOSE_GRACE_MS);
      this.terminateTimer.unref();
    }
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
