/**
 * What a {@link Session} needs from the connection under it: a bidirectional
 * channel of whole frames with WebSocket semantics (close codes, a graceful
 * close handshake, an abortive terminate), flow control by pausing the reading
 * side, and a count of bytes sent but not yet handed on. `wsChannel` (transport.ts)
 * puts a `ws` WebSocket behind it; `memorySessionPair` (memory.ts) an in-memory link.
 */

/** The receiving side of a channel; attached once, by the Session that owns it. */
export interface FrameHandlers {
  /** One whole frame; `isBinary` false for a text frame (which the protocol refuses). */
  frame(data: Buffer, isBinary: boolean): void;
  /** The channel has closed: the peer's close code and reason, or 1006 (abnormal) when no close frame arrived. */
  close(code: number, reason: string): void;
  /** A failure of the connection itself; a `close` follows. */
  error(err: Error): void;
}

export interface FrameChannel {
  /**
   * Send one binary frame: the concatenation of `parts` (a head, a data
   * payload, a MAC tag), which need not be joined first. The parts may be
   * handed to the socket without a copy: they must stay unchanged until
   * `written` is called (the socket took them, or the frame was dropped).
   * Ignored once the channel is closing or closed (as ws does; `written`
   * is still called).
   */
  send(parts: readonly Buffer[], written?: () => void): void;
  /** Bytes sent and not yet handed on (to the kernel for a socket, to the peer for memory). */
  readonly bufferedAmount: number;
  /** Open: neither side has started to close it. */
  readonly isOpen: boolean;
  /** Stop delivering frames to the handlers until {@link resume}. */
  pause(): void;
  resume(): void;
  /** Graceful close: send a close frame with `code` and `reason`; the peer answers with its own. */
  close(code: number, reason: string): void;
  /** Abort at once, without a close handshake; the peer sees an abnormal close (1006). */
  terminate(): void;
  /** Register the receiving side. */
  attach(handlers: FrameHandlers): void;
  /**
   * The peer has proven the key: lift a frame size limit the channel applies
   * before authentication (the WebSocket one refuses frames above
   * MAX_HANDSHAKE_FRAME_BYTES until then, from their header, see transport.ts).
   */
  liftFrameLimit?(): void;
  /**
   * Whether `frame` (as handed to `FrameHandlers.frame`) lives in memory the
   * channel reuses: it must then be given back with {@link release} once
   * nothing uses it any more, and must not be used after that.
   */
  owns?(frame: Buffer): boolean;
  /** Give back a frame {@link owns} said was the channel's (anything else is ignored). */
  release?(frame: Buffer): void;
}

/**
 * `code` of the Error a channel reports (through `FrameHandlers.error`) when it
 * refused a frame over its size limit without reading it (ws's own code).
 */
export const FRAME_TOO_LARGE = 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH';

/** Close code of a connection that ended without a close frame (RFC 6455 7.1.5); never sent on the wire. */
export const ABNORMAL_CLOSE = 1006;
