import * as http from 'node:http';
import * as https from 'node:https';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import type { Logger } from 'pino';
import { WebSocket, WebSocketServer, type RawData } from 'ws';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { BufferRing } from '../util/buffer-ring.js';
import { LogLimiter } from '../util/log-limit.js';
import type { FrameChannel, FrameHandlers } from './channel.js';
import { HANDSHAKE_TIMEOUT_MS } from './handshake.js';
import { MAX_EXTENT_BYTES, MAX_HANDSHAKE_FRAME_BYTES } from './messages.js';
import { Session } from './session.js';
import { clientCertRefusal, connectError, REFUSAL_HEADER, refusalOf, tlsReason, writeRefusal, type TlsMaterial } from './tls.js';

/**
 * The WebSocket transport: the secondary's listener and the primary's client,
 * each handing out {@link Session}s. No permessage-deflate (payloads are lz4
 * already, and deflate is far too slow); frames up to MAX_HANDSHAKE_FRAME_BYTES
 * until the peer has proven the key, then up to the largest data extent plus
 * room for its header and MAC.
 *
 * Before authentication a peer costs little: the listener admits at most
 * {@link PREAUTH_LIMITS} unauthenticated connections (in total and per source
 * address, counted from the TCP connection until the handshake proves the key
 * or the socket closes; extra ones are destroyed at once and logged with
 * TM_ERR_PREAUTH_LIMIT); the TLS handshake, the HTTP upgrade and each
 * handshake step have a 10 s timeout; and ws refuses a larger frame from its
 * header, before reading its payload.
 */

/** Largest frame accepted after authentication, bytes: a data extent's payload, its msgpack fields and its MAC. */
const MAX_FRAME_BYTES = MAX_EXTENT_BYTES + 65536;

/** Default bounds on unauthenticated connections of a listener. */
export const PREAUTH_LIMITS = { total: 64, perAddress: 8 };


/**
 * Lift ws's frame size limit of one WebSocket. ws takes `maxPayload` once per
 * server or client and has no public way to change it on a connection; its
 * Receiver reads `_maxPayload` at every frame header (ws 8.x), which is what
 * this sets. test/unit/transport.test.ts pins that behaviour, so an upgrade of
 * ws that changes it fails there instead of refusing every data extent.
 */
function setMaxPayload(ws: WebSocket, bytes: number): void {
  const receiver = (ws as unknown as { _receiver?: { _maxPayload?: unknown } })._receiver;
  if (!receiver || typeof receiver._maxPayload !== 'number') {
    throw new TmError(ErrorCodes.INTERNAL, 'this version of ws has no Receiver._maxPayload: cannot lift the pre-authentication frame limit');
  }
  receiver._maxPayload = bytes;
}

/** The parts of ws 8.x that {@link gatherWriter} writes through. */
interface WsInternals {
  _isServer?: unknown;
  _sender?: { _state?: unknown } | null;
  _socket?: Duplex | null;
}

/**
 * A writer of one WebSocket message made of several parts without joining
 * them: the frame header it builds itself, then every part, written to the
 * socket under one cork (what ws's own Sender does with a header and one
 * buffer). A client's frames carry the zero mask that connect() has ws use
 * (RFC 6455 requires a mask; zero leaves the payload as it is, see
 * connect()). Null when this ws does not look like ws 8.x (its Sender's
 * `_state` and the WebSocket's `_socket`, pinned by test/unit/transport.test.ts):
 * the caller then joins the parts and uses ws.send.
 *
 * Only used while the Sender is idle (`_state` 0: nothing queued behind a
 * compression or a Blob, neither of which this channel uses), so frames
 * keep their order with those ws sends itself (close, pong).
 */
export function gatherWriter(ws: WebSocket): ((parts: readonly Buffer[], written?: () => void) => boolean) | null {
  const w = ws as unknown as WsInternals;
  if (typeof w._isServer !== 'boolean' || !w._sender || typeof w._sender._state !== 'number' || !w._socket) return null;
  const sender = w._sender;
  const socket = w._socket;
  const mask = !w._isServer;
  return (parts, written) => {
    if (sender._state !== 0 || ws.readyState !== ws.OPEN) return false;
    let length = 0;
    for (const p of parts) length += p.length;
    const lenBytes = length >= 65536 ? 8 : length > 125 ? 2 : 0;
    const header = Buffer.allocUnsafe(2 + lenBytes + (mask ? 4 : 0));
    header[0] = 0x82; // FIN, binary
    header[1] = (mask ? 0x80 : 0) | (lenBytes === 8 ? 127 : lenBytes === 2 ? 126 : length);
    if (lenBytes === 8) header.writeBigUInt64BE(BigInt(length), 2);
    else if (lenBytes === 2) header.writeUInt16BE(length, 2);
    if (mask) header.writeUInt32BE(0, 2 + lenBytes);
    socket.cork();
    socket.write(header);
    for (let i = 0; i < parts.length - 1; i++) socket.write(parts[i]!);
    socket.write(parts[parts.length - 1]!, written ? () => written() : undefined);
    socket.uncork();
    return true;
  };
}

/** Bytes of the ring that received frames of a connection are joined into, once authenticated. */
export const RECEIVE_RING_BYTES = 32 * 1024 * 1024;
/** Frames from this size on are joined in the ring; smaller ones are not worth the bookkeeping. */
const RECEIVE_RING_MIN = 64 * 1024;

/** The parts of ws 8.x's Receiver that {@link receiveIntoRing} relies on. */
interface WsReceiverInternals {
  consume?: unknown;
  _buffers?: unknown;
  _bufferedBytes?: unknown;
  _fin?: unknown;
  _fragmented?: unknown;
}

/**
 * Make ws join the socket reads of each large, unfragmented message into
 * `ring` instead of a fresh Buffer: ws's Receiver.consume, with its one
 * allocation replaced (the rest is ws 8.x's own loop; pinned by
 * test/unit/transport.test.ts). A received 1 MiB frame otherwise costs 1 MiB
 * of new external memory, and V8 a major GC every 64 of them. The message
 * ws emits is then a view of the ring: the Session gives it back through
 * the channel's `release` once nothing uses it. False when this ws does not
 * look like 8.x (nothing is changed).
 */
export function receiveIntoRing(ws: WebSocket, ring: BufferRing): boolean {
  const r = (ws as unknown as { _receiver?: WsReceiverInternals })._receiver;
  if (!r || typeof r.consume !== 'function' || !Array.isArray(r._buffers) || typeof r._bufferedBytes !== 'number' || typeof r._fin !== 'boolean') return false;
  const own = r.consume as (this: WsReceiverInternals, n: number) => Buffer;
  r.consume = function (this: WsReceiverInternals & { _buffers: Buffer[]; _bufferedBytes: number }, n: number): Buffer {
    const first = this._buffers[0];
    // Headers, small or fragmented messages (ws joins fragments itself), or a
    // payload inside one socket read (ws hands out a view of it): ws's own way.
    if (n < RECEIVE_RING_MIN || !this._fin || this._fragmented || !first || n <= first.length) return own.call(this, n);
    const dst = ring.take(n);
    this._bufferedBytes -= n;
    let at = 0;
    while (at < n) {
      const buf = this._buffers[0]!;
      const take = Math.min(buf.length, n - at);
      dst.set(take === buf.length ? buf : buf.subarray(0, take), at);
      if (take === buf.length) this._buffers.shift();
      else this._buffers[0] = buf.subarray(take);
      at += take;
    }
    return dst;
  };
  return true;
}

/** Bytes of the staging buffer {@link readDirect} reads frame headers and small frames into. */
const STAGING_BYTES = 64 * 1024;
/** Binary frames with a payload above this go to the ring, read straight into it; smaller ones are copied out of the staging buffer. */
const DIRECT_MIN = 4 * 1024;

/** The socket's user-buffer read state (Node's `onread` option of net.Socket, `lib/net.js`), found by its symbols' names. */
function userBufferSymbols(socket: object): { buffer: symbol; callback: symbol; gen: symbol } | null {
  const syms = Object.getOwnPropertySymbols(socket);
  const find = (name: string) => syms.find((x) => x.description === name);
  const buffer = find('kBuffer');
  const callback = find('kBufferCb');
  const gen = find('kBufferGen');
  return buffer && callback && gen ? { buffer, callback, gen } : null;
}

/**
 * Read the connection's socket ourselves, once authenticated: Node reads it
 * into buffers this function hands out (a socket's `onread`, which Node
 * offers only when a socket is created, switched on here through the same
 * fields), instead of a new ArrayBuffer per read that ws then joins. The
 * payload of a binary frame above DIRECT_MIN is read straight into a buffer
 * of `ring`, in place: no copy besides the kernel's, and no memory allocated
 * per read, whose churn (about one GiB per GiB received) otherwise drives V8
 * into a major GC every few MiB. Headers and small frames are read into one
 * staging buffer; small binary frames are handed out as copies.
 *
 * Only whole binary frames (FIN, no RSV bit, opcode 2, masked as RFC 6455
 * wants for the side, within ws's `_maxPayload`) are taken here, and handed
 * to `deliver` in order. Control frames (ping, pong, close) are handed to ws's
 * own Receiver, whole; anything else (a text or fragmented frame, an RSV
 * bit, a wrong mask bit, an oversized length) hands that frame and the rest of
 * the stream to ws's Receiver, which then refuses it as it would have.
 *
 * Switched on only at a frame boundary: ws's Receiver holds no byte, and
 * nothing waits in the socket's own buffer (else false, nothing changed). The
 * handshake leaves it so: the secondary protects the session on the primary's
 * last plain frame, and the primary sends nothing more before `ready`. False
 * too when ws or Node does not look as expected (pinned by
 * test/unit/transport.test.ts).
 */
export function readDirect(ws: WebSocket, ring: BufferRing, deliver: (frame: Buffer) => void): boolean {
  const w = ws as unknown as { _socket?: Duplex | null; _receiver?: (WsReceiverInternals & { _state?: unknown; _maxPayload?: unknown; write?: unknown }) | null; _isServer?: unknown };
  const socket = w._socket as (Socket & { _handle?: { useUserBuffer?: (b: Uint8Array) => void } | null }) | null | undefined;
  const receiver = w._receiver;
  if (!socket || !receiver || typeof w._isServer !== 'boolean') return false;
  if (typeof socket._handle?.useUserBuffer !== 'function' || typeof receiver.write !== 'function') return false;
  if (receiver._state !== 0 || receiver._bufferedBytes !== 0 || receiver._fragmented !== 0 || typeof receiver._maxPayload !== 'number') return false;
  if (socket.readableLength !== 0 || socket.isPaused() || socket.destroyed) return false;
  const sym = userBufferSymbols(socket);
  if (!sym) return false;
  const fields = socket as unknown as Record<symbol, unknown>;
  if (fields[sym.buffer] !== null || fields[sym.callback] !== null || fields[sym.gen] !== null) return false;

  const isServer = w._isServer;
  const toWs = (b: Buffer) => (receiver.write as (b: Buffer) => boolean).call(receiver, b);
  const staging = Buffer.allocUnsafeSlow(STAGING_BYTES);
  /** Bytes of the staging buffer not parsed yet: [from, have). */
  let from = 0;
  let have = 0;
  /** The frame whose payload is being read into the ring: its buffer, the bytes in it, its mask. */
  let frame: { buf: Buffer; filled: number; mask: Buffer | null } | null = null;
  /** Everything from here on goes to ws's Receiver (a frame this path does not take). */
  let passthrough = false;

  const unmask = (b: Buffer, mask: Buffer | null) => {
    if (!mask) return;
    for (let i = 0; i < b.length; i++) b[i]! ^= mask[i & 3]!;
  };
  const done = (f: { buf: Buffer; mask: Buffer | null }) => {
    frame = null;
    unmask(f.buf, f.mask);
    deliver(f.buf);
  };
  /** Parse the staging buffer's bytes: whole frames out, a large frame's payload into the ring. */
  const parse = () => {
    while (!passthrough && !frame) {
      const n = have - from;
      if (n < 2) return;
      const b0 = staging[from]!;
      const b1 = staging[from + 1]!;
      const opcode = b0 & 0x0f;
      const masked = (b1 & 0x80) !== 0;
      let len = b1 & 0x7f;
      let head = 2;
      if (len === 126) {
        if (n < 4) return;
        len = staging.readUInt16BE(from + 2);
        head = 4;
      } else if (len === 127) {
        if (n < 10) return;
        const hi = staging.readUInt32BE(from + 2);
        len = hi > 0x1fffff ? Infinity : hi * 2 ** 32 + staging.readUInt32BE(from + 6);
        head = 10;
      }
      if (masked) head += 4;
      const ours = (b0 & 0xf0) === 0x80 && opcode === 2 && masked === isServer && len <= (receiver._maxPayload as number);
      const control = opcode >= 8 && len <= 125 && (b0 & 0x80) !== 0;
      if (!ours && !control) {
        // ws takes it from here and refuses what it refuses.
        passthrough = true;
        toWs(Buffer.from(staging.subarray(from, have)));
        from = have = 0;
        return;
      }
      if (n < head) return;
      // The zero mask (ours) leaves the payload as it is: no mask to apply.
      const mask = masked && staging.readUInt32BE(from + head - 4) !== 0 ? Buffer.from(staging.subarray(from + head - 4, from + head)) : null;
      if (ours && len > DIRECT_MIN) {
        const f = { buf: ring.take(len), filled: 0, mask };
        const take = Math.min(len, n - head);
        staging.copy(f.buf, 0, from + head, from + head + take);
        f.filled = take;
        from += head + take;
        if (take === len) done(f);
        else frame = f;
        continue;
      }
      if (n < head + len) return;
      const whole = staging.subarray(from, from + head + len);
      from += head + len;
      if (control) toWs(Buffer.from(whole));
      else {
        const payload = Buffer.from(whole.subarray(head));
        unmask(payload, mask);
        deliver(payload);
      }
    }
  };
  fields[sym.callback] = (nread: number, buf: Uint8Array): boolean | undefined => {
    try {
      if (passthrough) {
        toWs(Buffer.from(buf.subarray(0, nread)));
        return;
      }
      const f = frame as { buf: Buffer; filled: number; mask: Buffer | null } | null;
      if (f) {
        f.filled += nread;
        if (f.filled === f.buf.length) done(f);
        return;
      }
      have += nread;
      parse();
      if (from === have) from = have = 0;
    } catch (e) {
      socket.destroy(e instanceof Error ? e : new Error(String(e)));
      return false;
    }
  };
  // Where the next read goes: the rest of the payload being read, else the staging buffer's free end.
  fields[sym.gen] = (): Uint8Array => {
    const f = frame as { buf: Buffer; filled: number } | null;
    if (f) return f.buf.subarray(f.filled);
    if (from > 0 && STAGING_BYTES - have < 16 * 1024) {
      staging.copy(staging, 0, from, have);
      have -= from;
      from = 0;
    }
    return staging.subarray(have);
  };
  fields[sym.buffer] = staging;
  socket._handle.useUserBuffer(staging);
  return true;
}

/** A `ws` WebSocket as a {@link FrameChannel}. */
export function wsChannel(ws: WebSocket): FrameChannel {
  ws.binaryType = 'nodebuffer';
  const gather = gatherWriter(ws);
  let ring: BufferRing | null = null;
  let handlers: FrameHandlers | null = null;
  return {
    // One WebSocket message, its parts written without joining them when ws
    // allows (fragments instead would cost the receiver a copy to join them).
    send: (parts, written) => {
      if (parts.length > 1 && gather?.(parts, written)) return;
      ws.send(parts.length === 1 ? parts[0]! : Buffer.concat(parts), { binary: true }, written ? () => written() : undefined);
    },
    liftFrameLimit: () => {
      setMaxPayload(ws, MAX_FRAME_BYTES);
      // Data frames come only after authentication: only then is the ring worth its memory.
      const r = new BufferRing(RECEIVE_RING_BYTES);
      if ((handlers && readDirect(ws, r, (frame) => handlers!.frame(frame, true))) || receiveIntoRing(ws, r)) ring = r;
    },
    owns: (frame) => ring?.owns(frame) ?? false,
    release: (frame) => ring?.release(frame),
    get bufferedAmount() {
      return ws.bufferedAmount;
    },
    get isOpen() {
      return ws.readyState === ws.OPEN;
    },
    pause: () => ws.pause(),
    resume: () => ws.resume(),
    close: (code, reason) => ws.close(code, reason),
    terminate: () => ws.terminate(),
    attach(h) {
      handlers = h;
      ws.on('message', (data: RawData, isBinary: boolean) => {
        h.frame(Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data), isBinary);
      });
      ws.on('close', (code: number, reason: Buffer) => h.close(code, reason.toString()));
      ws.on('error', (err: Error) => h.error(err));
    },
  };
}

/** A listening transport: where it listens, and how to stop it. */
export interface Listener {
  readonly address: { host: string; port: number; tls: boolean };
  /** Terminate every connection and stop listening. Idempotent. */
  close(): Promise<void>;
}

/**
 * The listener of primaries: HTTPS with mutual TLS when `tls` is given (our
 * certificate; primaries' client certificates verified against `tls.ca`),
 * plain HTTP otherwise. A client whose certificate did not verify gets a 403
 * carrying TM_ERR_TLS and is logged; it never reaches the WebSocket (see
 * tls.ts for why this is not `rejectUnauthorized`). A request that is not an
 * upgrade gets 426. Every WebSocket becomes a Session named
 * `primary <address>:<port>`, handed to `onSession`.
 *
 * @throws TmError TM_ERR_CONNECTION when it cannot listen on host:port.
 */
export async function listen(o: {
  host: string;
  port: number;
  tls: TlsMaterial | null;
  log: Logger;
  onSession: (session: Session) => void;
  /** Bounds on unauthenticated connections; {@link PREAUTH_LIMITS} by default. */
  limits?: { total: number; perAddress: number };
}): Promise<Listener> {
  const { host, port, tls, log } = o;
  const limits = o.limits ?? PREAUTH_LIMITS;
  /** Why this request's client is refused (and logged), or null. */
  const refusal = (req: http.IncomingMessage): string | null => {
    if (!tls) return null;
    const why = clientCertRefusal(req.socket as TLSSocket);
    if (why) {
      const remote = `${req.socket.remoteAddress}:${req.socket.remotePort}`;
      log.warn({ code: ErrorCodes.TLS, remote, reason: (req.socket as TLSSocket).authorizationError ?? null }, `TLS client ${remote} refused: ${why}`);
    }
    return why;
  };
  const onRequest = (req: http.IncomingMessage, res: http.ServerResponse) => {
    const why = refusal(req);
    if (why) {
      res.writeHead(403, { 'content-type': 'text/plain', connection: 'close', [REFUSAL_HEADER]: ErrorCodes.TLS });
      return void res.end(`${ErrorCodes.TLS}: ${why}\n`);
    }
    res.writeHead(426, { 'content-type': 'text/plain' });
    res.end('thinmirror: WebSocket upgrade required\n');
  };
  // An upgrade request must arrive complete within the handshake timeout (checked every second).
  const httpLimits = { headersTimeout: HANDSHAKE_TIMEOUT_MS, requestTimeout: HANDSHAKE_TIMEOUT_MS, connectionsCheckingInterval: 1000 };
  const server: http.Server = tls
    ? https.createServer(
        { ...httpLimits, key: tls.key, cert: tls.cert, ca: tls.ca, requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.2', handshakeTimeout: HANDSHAKE_TIMEOUT_MS },
        onRequest,
      )
    : http.createServer(httpLimits, onRequest);
  const preauth = preauthGate(limits, log);
  // First, before TLS or HTTP see the socket: a refused one costs an accept and a close.
  server.prependListener('connection', (tcp: Socket) => preauth.admit(tcp));
  if (tls) {
    // A socket that failed its handshake no longer knows its peer's address: note
    // it when the TCP connection arrives (the TLS socket wraps it as `_parent`).
    const remotes = new WeakMap<object, string>();
    server.on('connection', (tcp: Socket) => remotes.set(tcp, `${tcp.remoteAddress}:${tcp.remotePort}`));
    // The client certificate is checked on every request: no renegotiation (TLS 1.2) may swap it meanwhile.
    server.on('secureConnection', (socket: TLSSocket) => socket.disableRenegotiation());
    server.on('tlsClientError', (err: NodeJS.ErrnoException, socket: TLSSocket) => {
      const tcp = (socket as unknown as { _parent?: object })._parent;
      if (tcp && preauth.refused(tcp)) return; // logged by the gate
      const remote = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : ((tcp && remotes.get(tcp)) ?? 'an unknown address');
      const hint =
        err.code === 'ECONNRESET'
          ? ' (the client closed the connection during the TLS handshake: it may have refused this listener\'s certificate, see its log)'
          : err.code === 'ERR_SSL_HTTP_REQUEST'
            ? ' (a plain ws:// client: its peer should be wss://)'
            : '';
      log.warn({ code: ErrorCodes.TLS, remote, reason: err.code ?? null }, `TLS handshake with ${remote} failed: ${tlsReason(err)}${hint}`);
    });
  }
  const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: MAX_HANDSHAKE_FRAME_BYTES });
  server.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    const why = refusal(req);
    if (why) return writeRefusal(socket, ErrorCodes.TLS, why);
    wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
  });
  wss.on('connection', (ws: WebSocket, req: http.IncomingMessage) => {
    const session = new Session(wsChannel(ws), `primary ${req.socket.remoteAddress}:${req.socket.remotePort}`);
    // Authenticated: no longer counted against the bounds (its socket's close releases it otherwise).
    session.once('authenticated', () => preauth.release(req.socket));
    o.onSession(session);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(asTmError(e, ErrorCodes.CONNECTION, `listening on ${host}:${port}`)));
    server.listen(port, host, () => resolve());
  });
  const a = server.address();
  let closing: Promise<void> | null = null;
  return {
    address: a && typeof a === 'object' ? { host: a.address, port: a.port, tls: !!tls } : { host, port, tls: !!tls },
    close() {
      closing ??= (async () => {
        for (const ws of wss.clients) ws.terminate();
        wss.close();
        await new Promise((r) => server.close(r));
      })();
      return closing;
    },
  };
}

/**
 * Connect to a secondary's listener at `url` (ws:// or wss://) and return the
 * Session, named `secondary <url>`. For wss://, `tls` is our client identity
 * and the only CA the secondary's certificate is verified against; it is not
 * used for ws://. Aborting `signal` terminates the socket.
 *
 * @throws TmError the listener's coded refusal (e.g. TM_ERR_TLS for our
 *   certificate), TM_ERR_TLS when TLS itself failed, else TM_ERR_CONNECTION
 *   (see {@link connectError}), an abort included.
 */
export function connect(url: string, o: { tls: TlsMaterial | null; signal: AbortSignal }): Promise<Session> {
  const tls = url.startsWith('wss://') ? o.tls : null;
  const { signal } = o;
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, {
      perMessageDeflate: false,
      handshakeTimeout: 10_000,
      // Lifted once the secondary has proven the key (Session.protect).
      maxPayload: MAX_HANDSHAKE_FRAME_BYTES,
      // A zero mask makes ws skip masking (a copy and XOR of every payload byte).
      // Masking protects HTTP intermediaries from scripts in browsers; a daemon
      // talking to a daemon (inside TLS in production) has no use for it.
      generateMask: (mask: Buffer) => void mask.fill(0),
      // wss://: our client certificate; the secondary's is verified against our
      // CA only (not the system's) and against the URL's host (ws sends it as
      // SNI and Node checks the certificate's DNS or IP subjectAltName).
      ...(tls ? { ca: tls.ca, cert: tls.cert, key: tls.key, minVersion: 'TLSv1.2' as const, rejectUnauthorized: true } : {}),
    });
    const onAbort = () => ws.terminate();
    signal.addEventListener('abort', onAbort, { once: true });
    ws.once('open', () => {
      ws.removeAllListeners('error');
      ws.removeAllListeners('unexpected-response');
      signal.removeEventListener('abort', onAbort);
      resolve(new Session(wsChannel(ws), `secondary ${url}`));
    });
    ws.once('error', (err) => {
      signal.removeEventListener('abort', onAbort);
      reject(connectError(url, err));
    });
    // The listener answered the upgrade with a refusal (e.g. our certificate, TM_ERR_TLS).
    ws.once('unexpected-response', (_req, res) => {
      ws.on('error', () => {});
      void refusalOf(res, url).then((err) => {
        signal.removeEventListener('abort', onAbort);
        reject(err);
        ws.terminate();
      });
    });
    // Already aborted: 'abort' will not fire again. Same outcome as an abort during the handshake.
    if (signal.aborted) onAbort();
  });
}

/**
 * The bounds on a listener's unauthenticated connections: each TCP connection
 * takes a place (in total and for its address) from `admit` until `release`
 * (its session authenticated) or its close; one that finds no place is
 * destroyed at once. Refusals are logged with TM_ERR_PREAUTH_LIMIT, at most
 * one line per 5 s (the line counts the others, see LogLimiter).
 */
function preauthGate(limits: { total: number; perAddress: number }, log: Logger) {
  let total = 0;
  const perAddress = new Map<string, number>();
  /** The release of each admitted connection that still holds a place, by `address:port`. */
  const held = new Map<string, () => void>();
  const refusedSockets = new WeakSet<object>();
  const logLimit = new LogLimiter();
  const keyOf = (s: { remoteAddress?: string | undefined; remotePort?: number | undefined }) => `${s.remoteAddress}:${s.remotePort}`;
  return {
    admit(tcp: Socket): void {
      const address = tcp.remoteAddress ?? 'an unknown address';
      const fromAddress = perAddress.get(address) ?? 0;
      if (total >= limits.total || fromAddress >= limits.perAddress) {
        refusedSockets.add(tcp);
        tcp.destroy();
        const turn = logLimit.take();
        if (!turn) return;
        const unlogged = turn.unlogged;
        const why = total >= limits.total ? `${total} unauthenticated connections in total (at most ${limits.total})` : `${fromAddress} unauthenticated connections from ${address} (at most ${limits.perAddress})`;
        log.warn(
          { code: ErrorCodes.PREAUTH_LIMIT, remote: `${address}:${tcp.remotePort}`, unauthenticated: total, fromAddress, refusedUnlogged: unlogged },
          `connection from ${address} refused: ${why}${unlogged ? `; ${unlogged} more refused since the last such line` : ''}`,
        );
        return;
      }
      total++;
      perAddress.set(address, fromAddress + 1);
      const key = keyOf(tcp);
      let done = false;
      const release = () => {
        if (done) return;
        done = true;
        total--;
        const n = (perAddress.get(address) ?? 1) - 1;
        if (n > 0) perAddress.set(address, n);
        else perAddress.delete(address);
        if (held.get(key) === release) held.delete(key);
      };
      held.set(key, release);
      tcp.once('close', release);
    },
    /** The session on this socket (TCP or TLS over it: same addresses) has authenticated. */
    release(socket: { remoteAddress?: string | undefined; remotePort?: number | undefined }): void {
      held.get(keyOf(socket))?.();
    },
    refused(tcp: object): boolean {
      return refusedSockets.has(tcp);
    },
  };
}
