import * as http from 'node:http';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import type { MirrorStatus } from '../mirror/status.js';
import type { LastReload } from './reload.js';

export const CONTROL_SOCKET = 'control.sock';

export interface DaemonStatus {
  node: string;
  pid: number;
  version: string;
  startedAt: string;
  /** The listener of primaries; `tls`: HTTPS with mutual TLS (config `tls:`). */
  listen: { host: string; port: number; tls: boolean } | null;
  /** The TCP listener of GET /metrics (config `metrics:`), or null. */
  metrics: { host: string; port: number } | null;
  /**
   * The config file in force: its path, when it was loaded (at start or by the
   * last reload that applied one) and the last reload (SIGHUP), null before any.
   */
  config: { path: string; loadedAt: string; lastReload: LastReload | null };
  mirrors: MirrorStatusEntry[];
}

/** A mirror's status as served by GET /status: MirrorStatus plus what the daemon measures. */
export type MirrorStatusEntry = MirrorStatus & {
  /** Progress of the generation in flight per second (averaged over the last seconds), null when none is in flight or not yet measured. */
  rateBytesPerSecond: number | null;
};

/** What the control socket serves. */
export interface ControlHandlers {
  status: () => Promise<DaemonStatus>;
  /** Prometheus text exposition. */
  metrics: () => Promise<{ contentType: string; body: string }>;
}

export function controlSocketPath(stateDir: string): string {
  return path.join(stateDir, CONTROL_SOCKET);
}

function sendJson(res: http.ServerResponse, code: number, body: unknown): void {
  res.writeHead(code, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body, null, 2) + '\n');
}

/** GET /metrics: the Prometheus text, or 500 with the coded error as JSON. */
export function serveMetrics(res: http.ServerResponse, metrics: ControlHandlers['metrics']): void {
  metrics().then(
    (m) => {
      res.writeHead(200, { 'content-type': m.contentType });
      res.end(m.body);
    },
    (e) => sendJson(res, 500, { error: asTmError(e).toJSON() }),
  );
}

function notFound(req: http.IncomingMessage, res: http.ServerResponse): void {
  sendJson(res, 404, { error: { code: ErrorCodes.USAGE, message: `no such endpoint: ${req.method} ${req.url}` } });
}

/**
 * HTTP over a unix socket in the state directory, mode 0600 (root or the
 * daemon's user only). GET /status answers JSON, GET /metrics Prometheus text.
 */
export async function startControlServer(stateDir: string, handlers: ControlHandlers): Promise<http.Server> {
  const sock = controlSocketPath(stateDir);
  // We hold the state directory's lock, so a socket file here is a leftover.
  await fsp.rm(sock, { force: true });
  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/status') {
      handlers.status().then(
        (st) => sendJson(res, 200, st),
        (e) => sendJson(res, 500, { error: asTmError(e).toJSON() }),
      );
      return;
    }
    if (req.method === 'GET' && req.url === '/metrics') return serveMetrics(res, handlers.metrics);
    notFound(req, res);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(asTmError(e, ErrorCodes.CONTROL, `control socket ${sock}`)));
    const old = process.umask(0o177);
    server.listen(sock, () => {
      process.umask(old);
      resolve();
    });
  });
  await fsp.chmod(sock, 0o600);
  return server;
}

/** A TCP listener that serves only GET /metrics (config `metrics: { host, port }`). */
export async function startMetricsServer(host: string, port: number, metrics: ControlHandlers['metrics']): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && (req.url === '/metrics' || req.url?.startsWith('/metrics?'))) return serveMetrics(res, metrics);
    notFound(req, res);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(asTmError(e, ErrorCodes.CONNECTION, `metrics listener on ${host}:${port}`)));
    server.listen(port, host, () => resolve());
  });
  return server;
}

/** GET a path from a daemon's control socket: the answer's status code, content type and body. */
export function controlGet(stateDir: string, urlPath: string, timeoutMs = 5000): Promise<{ statusCode: number; contentType: string; body: string }> {
  const sock = controlSocketPath(stateDir);
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath: sock, path: urlPath, method: 'GET', timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ statusCode: res.statusCode ?? 0, contentType: String(res.headers['content-type'] ?? ''), body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', (e: NodeJS.ErrnoException) => {
      const hint = e.code === 'ENOENT' || e.code === 'ECONNREFUSED' ? ' (is the daemon running with this config?)' : '';
      reject(new TmError(ErrorCodes.CONTROL, `cannot reach the daemon at ${sock}: ${e.message}${hint}`, { cause: e }));
    });
    req.end();
  });
}

/** GET a path from a daemon's control socket and parse the JSON answer. */
export async function controlRequest<T>(stateDir: string, urlPath: string, timeoutMs = 5000): Promise<T> {
  const r = await controlGet(stateDir, urlPath, timeoutMs);
  try {
    return JSON.parse(r.body) as T;
  } catch (e) {
    throw new TmError(ErrorCodes.CONTROL, `control socket ${controlSocketPath(stateDir)} answered something that is not JSON`, { cause: e });
  }
}
