import { X509Certificate } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import type * as http from 'node:http';
import type { Duplex } from 'node:stream';
import { createSecureContext, type TLSSocket } from 'node:tls';
import type { Logger } from 'pino';
import { ErrorCodes, TmError, type ErrorCode } from '../errors.js';

/**
 * Mutual TLS around the WebSocket (docs/tls.md). The secondary's listener asks
 * every client for a certificate and verifies it against its CA; the primary
 * verifies the secondary's certificate against its CA and the URL's host.
 *
 * Why the listener does not use `rejectUnauthorized: true`: Node then accepts
 * the handshake and destroys the socket without a TLS alert, so the primary
 * sees only ECONNRESET ("socket hang up", like a network fault) and the
 * listener's `tlsClientError` carries neither the reason nor the address. Here
 * the listener verifies during the handshake as well (`requestCert`), and every
 * HTTP request or upgrade on a socket whose certificate failed is answered
 * with 403 and the code in {@link REFUSAL_HEADER} before anything else runs: no
 * WebSocket, no handshake, nothing of a volume. The primary reads the code and
 * reason from that answer.
 */

/** Header of a refusal before the WebSocket upgrade: the TM_ERR_ code; the body is the message. */
export const REFUSAL_HEADER = 'x-thinmirror-error';

/** OpenSSL X509 verification results as Node names them (err.code, TLSSocket.authorizationError), and EPROTO (a TLS protocol failure). */
const TLS_CODES = new Set<string>([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_CRL',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'UNABLE_TO_DECRYPT_CRL_SIGNATURE',
  'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY',
  'CERT_SIGNATURE_FAILURE',
  'CRL_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CERT_HAS_EXPIRED',
  'CRL_NOT_YET_VALID',
  'CRL_HAS_EXPIRED',
  'ERROR_IN_CERT_NOT_BEFORE_FIELD',
  'ERROR_IN_CERT_NOT_AFTER_FIELD',
  'ERROR_IN_CRL_LAST_UPDATE_FIELD',
  'ERROR_IN_CRL_NEXT_UPDATE_FIELD',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'CERT_CHAIN_TOO_LONG',
  'CERT_REVOKED',
  'INVALID_CA',
  'PATH_LENGTH_EXCEEDED',
  'INVALID_PURPOSE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'HOSTNAME_MISMATCH',
  'EPROTO',
]);

/** A failure of TLS itself (verification, alert, handshake), as opposed to the network. */
export function isTlsFailure(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | null)?.code;
  return typeof code === 'string' && (TLS_CODES.has(code) || /^ERR_(SSL|TLS)_/.test(code));
}

/** "certificate has expired (CERT_HAS_EXPIRED)": OpenSSL's words and code. */
export function tlsReason(err: Error): string {
  const code = (err as NodeJS.ErrnoException).code;
  // OpenSSL's own lines ("80CC...:error:0A00010B:SSL routines:ssl3_get_record:wrong version number:../deps/...") keep only the reason.
  const openssl = /error:[0-9A-F]+:[^:]*:[^:]*:([^:]+)/.exec(err.message);
  const text = openssl ? openssl[1]! : err.message;
  return code && !text.includes(code) ? `${text} (${code})` : text;
}

/**
 * Why the listener refuses this client, or null when its certificate verified
 * against the CA. Only for sockets of a TLS listener with `requestCert`.
 */
export function clientCertRefusal(socket: TLSSocket): string | null {
  if (socket.authorized) return null;
  const peer = socket.getPeerCertificate();
  if (!peer || Object.keys(peer).length === 0) return 'no client certificate was presented';
  const subject = peer.subject?.CN ? ` CN=${peer.subject.CN}` : '';
  return `client certificate${subject} refused: ${socket.authorizationError ?? 'not verified'}`;
}

/** Answer an HTTP request or upgrade with 403 carrying a coded refusal, and close. */
export function writeRefusal(socket: Duplex, code: ErrorCode, message: string): void {
  const body = `${code}: ${message}\n`;
  socket.end(
    `HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Type: text/plain\r\n${REFUSAL_HEADER}: ${code}\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
  );
}

/**
 * The coded error of an answer other than 101 to our upgrade request: a
 * listener's refusal ({@link writeRefusal}) keeps its code; anything else is
 * TM_ERR_CONNECTION with the status.
 */
export async function refusalOf(res: http.IncomingMessage, url: string): Promise<TmError> {
  const header = res.headers[REFUSAL_HEADER];
  const code = typeof header === 'string' && (Object.values(ErrorCodes) as string[]).includes(header) ? (header as ErrorCode) : null;
  let body = '';
  res.setEncoding('utf8');
  try {
    for await (const chunk of res) {
      body += chunk as string;
      if (body.length > 4096) break;
    }
  } catch {
    // the message is best effort; the code is what counts
  }
  body = body.trim().slice(0, 1024);
  if (code) {
    const text = body.startsWith(`${code}: `) ? body.slice(code.length + 2) : body;
    return new TmError(code, `secondary ${url} refused the session: ${text}`);
  }
  return new TmError(ErrorCodes.CONNECTION, `cannot connect to ${url}: unexpected HTTP ${res.statusCode}${body ? `: ${body}` : ''}`);
}

/**
 * The coded error of a failed connection to `url`: TM_ERR_TLS when TLS itself
 * failed on a wss:// URL (the secondary's certificate did not verify, an alert,
 * a listener without TLS), else TM_ERR_CONNECTION.
 */
export function connectError(url: string, err: Error): TmError {
  const code = (err as NodeJS.ErrnoException).code;
  if (!url.startsWith('wss://') || !isTlsFailure(err)) return new TmError(ErrorCodes.CONNECTION, `cannot connect to ${url}: ${err.message}`, { cause: err });
  if (code === 'EPROTO' || code === 'ERR_SSL_WRONG_VERSION_NUMBER') {
    return new TmError(ErrorCodes.TLS, `TLS handshake with secondary ${url} failed: ${tlsReason(err)} (is it listening without tls:?)`, { cause: err });
  }
  if (code && !code.startsWith('ERR_')) {
    return new TmError(ErrorCodes.TLS, `the certificate of secondary ${url} was refused: ${tlsReason(err)}`, { cause: err });
  }
  return new TmError(ErrorCodes.TLS, `TLS with secondary ${url} failed: ${tlsReason(err)}`, { cause: err });
}

/** A TLS identity: CA certificate(s) that verify the peer, our certificate and its private key (absolute paths). */
export interface TlsFiles {
  ca: string;
  cert: string;
  key: string;
  /** Where they are configured: the node's `tls:` or the mirror's own. */
  origin: 'node' | 'mirror';
}

/** The PEM contents of a TLS identity, read by {@link readTlsFiles}. */
export interface TlsMaterial {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  /** Expiry of our certificate (validTo), for a warning when it is past. */
  notAfter: Date;
}

/**
 * Read the CA, certificate and key of a TLS identity and check that they
 * parse and that the key belongs to the certificate. Failures are
 * TmError(TM_ERR_CONFIG) naming the config key (`what`, e.g. "tls" or
 * `mirror db1: tls`) and the file. An expired certificate is not refused
 * here: the peer refuses it (and says so); with `expiry` it is logged as a
 * warning naming who will refuse it.
 */
export async function readTlsFiles(files: Omit<TlsFiles, 'origin'>, what: string, expiry?: { log: Logger; refusedBy: string }): Promise<TlsMaterial> {
  const read = async (k: 'ca' | 'cert' | 'key'): Promise<Buffer> => {
    try {
      return await fsp.readFile(files[k]);
    } catch (e) {
      throw new TmError(ErrorCodes.CONFIG, `cannot read ${what}.${k} ${files[k]}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
    }
  };
  const [ca, cert, key] = [await read('ca'), await read('cert'), await read('key')];
  let notAfter: Date;
  try {
    notAfter = new Date(new X509Certificate(cert).validTo);
  } catch (e) {
    throw new TmError(ErrorCodes.CONFIG, `${what}.cert ${files.cert} is not a PEM certificate: ${(e as Error).message}`, { cause: e });
  }
  const caCerts = ca.toString('latin1').match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (caCerts.length === 0) throw new TmError(ErrorCodes.CONFIG, `${what}.ca ${files.ca} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`);
  for (const pem of caCerts) {
    try {
      new X509Certificate(pem);
    } catch (e) {
      throw new TmError(ErrorCodes.CONFIG, `${what}.ca ${files.ca} holds a certificate that does not parse: ${(e as Error).message}`, { cause: e });
    }
  }
  try {
    createSecureContext({ ca, cert, key });
  } catch (e) {
    const reason = (e as NodeJS.ErrnoException).code ?? (e as Error).message;
    throw new TmError(ErrorCodes.CONFIG, `${what}: cannot use ca ${files.ca}, cert ${files.cert} and key ${files.key} together (${reason}: ${(e as Error).message})`, { cause: e });
  }
  if (expiry && notAfter.getTime() < Date.now()) {
    expiry.log.warn({ code: ErrorCodes.TLS, cert: files.cert, notAfter: notAfter.toISOString() }, `${what}.cert ${files.cert} expired on ${notAfter.toISOString()}: ${expiry.refusedBy} will refuse it`);
  }
  return { ca, cert, key, notAfter };
}
