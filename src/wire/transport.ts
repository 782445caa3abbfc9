import * as http from 'node:http';
import * as https from 'node:https';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import type { Logger } from 'pino';
import { WebSocket, WebSocketServer, type RawData } from 'ws';
import { asTmError, ErrorCodes } from '../errors.js';
import type { FrameChannel } from './channel.js';
import { MAX_EXTENT_BYTES } from './messages.js';
import { Session } from './session.js';
import { clientCertRefusal, connectError, REFUSAL_HEADER, refusalOf, tlsReason, writeRefusal, type TlsMaterial } from './tls.js';

/**
 * The WebSocket transport: the secondary's listener and the primary's client,
 * each handing out {@link Session}s. No permessage-deflate (payloads are lz4
 * already, and deflate is far too slow); frames up to the largest data extent
 * plus room for its header.
 */

/** Largest frame accepted, bytes: a data extent's payload and its msgpack fields. */
const MAX_FRAME_BYTES = MAX_EXTENT_BYTES + 65536;

/** A `ws` WebSocket as a {@link FrameChannel}. */
export function wsChannel(ws: WebSocket): FrameChannel {
  ws.binaryType = 'nodebuffer';
  return {
    send: (frame) => ws.send(frame, { binary: true }),
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
export async function listen(o: { host: string; port: number; tls: TlsMaterial | null; log: Logger; onSession: (session: Session) => void }): Promise<Listener> {
  const { host, port, tls, log } = o;
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
  const server: http.Server = tls
    ? https.createServer({ key: tls.key, cert: tls.cert, ca: tls.ca, requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.2' }, onRequest)
    : http.createServer(onRequest);
  if (tls) {
    // A socket that failed its handshake no longer knows its peer's address: note
    // it when the TCP connection arrives (the TLS socket wraps it as `_parent`).
    const remotes = new WeakMap<object, string>();
    server.on('connection', (tcp: Socket) => remotes.set(tcp, `${tcp.remoteAddress}:${tcp.remotePort}`));
    // The client certificate is checked on every request: no renegotiation (TLS 1.2) may swap it meanwhile.
    server.on('secureConnection', (socket: TLSSocket) => socket.disableRenegotiation());
    server.on('tlsClientError', (err: NodeJS.ErrnoException, socket: TLSSocket) => {
      const tcp = (socket as unknown as { _parent?: object })._parent;
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
  const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: MAX_FRAME_BYTES });
  server.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    const why = refusal(req);
    if (why) return writeRefusal(socket, ErrorCodes.TLS, why);
    wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
  });
  wss.on('connection', (ws: WebSocket, req: http.IncomingMessage) => {
    o.onSession(new Session(wsChannel(ws), `primary ${req.socket.remoteAddress}:${req.socket.remotePort}`));
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
      maxPayload: MAX_FRAME_BYTES,
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
