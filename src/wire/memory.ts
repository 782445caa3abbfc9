import { ABNORMAL_CLOSE, type FrameChannel, type FrameHandlers } from './channel.js';
import { Session } from './session.js';

/**
 * Two Sessions joined by memory, for tests that need no sockets. The link keeps
 * the WebSocket semantics Session relies on: frames arrive in order, one event
 * loop turn later (setImmediate, like socket I/O: never inside send(), and a
 * burst of sends shows up in bufferedAmount); a paused side receives nothing
 * until it resumes, so its peer's bufferedAmount grows (backpressure); close()
 * is a close handshake (the peer sees the code after every frame sent before it,
 * and answers with its own close frame); terminate() ends the connection without
 * a close frame (the peer sees 1006 after what was already sent to it).
 */

/**
 * What happens to one frame on its way: delivered, replaced (by a copy of
 * `replace`, or by copies of each frame of a list, in order: a relay that
 * replays, reorders or injects frames), lost, or the link is cut at this frame:
 * the frames sent before it still arrive, this one and every later one from
 * either side are lost, and both sides see an abnormal close (1006), as after a
 * TCP reset.
 */
export type FrameAction = 'pass' | 'drop' | 'cut' | { replace: Buffer | readonly Buffer[] };

export interface MemorySessionPairOptions {
  /** `peerName` of a and of b (each names the other side); default `['peer b', 'peer a']`. */
  names?: [string, string];
  /** Passed to both Sessions (messages queued before the channel is paused). */
  maxQueued?: number;
  /**
   * Called on every frame sent, error frames included; `index` counts the frames
   * sent from that side from 0. The frame must not be kept: it may change after
   * the call.
   */
  onFrame?: (from: 'a' | 'b', index: number, frame: Buffer) => FrameAction;
}

export interface MemorySessionPair {
  a: Session;
  b: Session;
  /** Cut the link now, frames in flight lost: both sides end with TM_ERR_CONNECTION (1006). */
  cut(): void;
  /** Frames sent so far from each side (the next frame's `index`). */
  readonly frames: { readonly a: number; readonly b: number };
}

/** A close frame (`abort` false) or the end of the connection without one (`abort` true). */
type Item = { kind: 'frame'; data: Buffer } | { kind: 'close'; code: number; reason: string; abort: boolean };

/** One end of the link: a FrameChannel whose peer is the other end. */
class MemoryEnd implements FrameChannel {
  peer!: MemoryEnd;
  /** Frames sent into the link from this end. */
  sent = 0;
  private handlers: FrameHandlers | null = null;
  /** What the peer sent and this end has not received yet, and the frame bytes in it. */
  private inbound: Item[] = [];
  private inboundBytes = 0;
  private paused = false;
  private scheduled = false;
  private closeSent = false;
  /** The close event is due or emitted: nothing more is received or sent. */
  private closed = false;

  constructor(
    private readonly side: 'a' | 'b',
    private readonly opts: MemorySessionPairOptions,
  ) {}

  attach(handlers: FrameHandlers): void {
    this.handlers = handlers;
  }

  send(parts: readonly Buffer[], written?: () => void): void {
    try {
      this.transmit(parts.length === 1 ? parts[0]! : Buffer.concat(parts));
    } finally {
      written?.();
    }
  }

  /** One frame on the wire, as a WebSocket message would be (its parts joined). */
  private transmit(frame: Buffer): void {
    if (!this.isOpen) return;
    const index = this.sent++;
    const action = this.opts.onFrame?.(this.side, index, frame) ?? 'pass';
    if (action === 'drop') return;
    if (action === 'cut') return this.terminate();
    // A copy: the sender may reuse its buffer once send() returns.
    const out = action === 'pass' ? [frame] : Buffer.isBuffer(action.replace) ? [action.replace] : action.replace;
    for (const f of out) this.peer.receive({ kind: 'frame', data: Buffer.from(f) });
  }

  get bufferedAmount(): number {
    return this.peer.inboundBytes;
  }

  get isOpen(): boolean {
    return !this.closeSent && !this.closed;
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    this.schedule();
  }

  close(code: number, reason: string): void {
    if (!this.isOpen) return;
    this.closeSent = true;
    this.peer.receive({ kind: 'close', code, reason, abort: false });
  }

  terminate(): void {
    if (this.closed) return;
    this.peer.receive({ kind: 'close', code: ABNORMAL_CLOSE, reason: '', abort: true });
    this.abort();
  }

  /** End here at once, dropping what has not arrived yet; the close event follows (1006: no close frame was received). */
  abort(): void {
    if (this.closed) return;
    this.closed = true;
    this.inbound = [];
    this.inboundBytes = 0;
    setImmediate(() => this.handlers?.close(ABNORMAL_CLOSE, ''));
  }

  private receive(item: Item): void {
    if (this.closed) return;
    this.inbound.push(item);
    if (item.kind === 'frame') this.inboundBytes += item.data.length;
    this.schedule();
  }

  private schedule(): void {
    if (this.scheduled || this.paused || this.closed || this.inbound.length === 0) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.deliver();
    });
  }

  private deliver(): void {
    // A handler may pause this end or close either one: checked before every item.
    while (!this.paused && !this.closed && this.inbound.length > 0) {
      const item = this.inbound.shift()!;
      if (item.kind === 'frame') {
        this.inboundBytes -= item.data.length;
        this.handlers?.frame(item.data, true);
        continue;
      }
      if (item.abort) {
        this.abort();
        return;
      }
      // A close frame: answered with the same code and reason (as ws does), then closed.
      if (!this.closeSent) {
        this.closeSent = true;
        this.peer.receive({ kind: 'close', code: item.code, reason: item.reason, abort: false });
      }
      this.closed = true;
      this.inbound = [];
      this.inboundBytes = 0;
      this.handlers?.close(item.code, item.reason);
    }
  }
}

/**
 * Two Sessions `a` and `b` talking over memory (see the top of this file for
 * what the link guarantees). Every frame arrives as a copy of what was sent.
 */
export function memorySessionPair(o: MemorySessionPairOptions = {}): MemorySessionPair {
  const [nameA, nameB] = o.names ?? ['peer b', 'peer a'];
  const ends = { a: new MemoryEnd('a', o), b: new MemoryEnd('b', o) };
  ends.a.peer = ends.b;
  ends.b.peer = ends.a;
  return {
    a: new Session(ends.a, nameA, o.maxQueued),
    b: new Session(ends.b, nameB, o.maxQueued),
    cut() {
      ends.a.abort();
      ends.b.abort();
    },
    frames: {
      get a() {
        return ends.a.sent;
      },
      get b() {
        return ends.b.sent;
      },
    },
  };
}
