import * as http from 'node:http';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { asTmError, ErrorCodes, TmError, type ErrorCode } from '../errors.js';
import type { DrillInfo, DrillStarted, DrillStopped } from '../mirror/drill.js';
import type { RoleChangeReport } from '../mirror/mirror.js';
import type { MirrorStatus } from '../mirror/status.js';
import type { LastReload } from './reload.js';
import { CONTROL_SOCKET } from './state-dir.js';

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
  /** The drill actions (docs/drills.md); absent: the routes answer 404. */
  drills?: DrillHandlers;
  /** promote, demote, switchover, resolve (docs/runbook.md); absent: the routes answer 404. */
  roles?: RoleHandlers;
}

/** The role actions: `POST /mirrors/MIRROR/{promote,demote,switchover,resolve}` with a JSON body of options; 200 `{result: RoleChangeReport}`. */
export type RoleAction = 'promote' | 'demote' | 'switchover' | 'resolve';
export type RoleHandlers = (mirror: string, action: RoleAction, o: { force: boolean; discardLocal: boolean }) => Promise<RoleChangeReport>;

const ROLE_ACTIONS: readonly string[] = ['promote', 'demote', 'switchover', 'resolve'];

/** Serve a role route; false when `req` is not one. */
function serveRoles(req: http.IncomingMessage, res: http.ServerResponse, h: RoleHandlers): boolean {
  if (req.method !== 'POST') return false;
  let parts: string[];
  try {
    parts = new URL(req.url ?? '/', 'http://localhost').pathname.split('/').filter(Boolean).map(decodeURIComponent);
  } catch {
    return false;
  }
  if (parts.length !== 3 || parts[0] !== 'mirrors' || !ROLE_ACTIONS.includes(parts[2]!)) return false;
  answer(res, 200, async () => {
    const b = await jsonBody(req);
    for (const k of Object.keys(b)) if (k !== 'force' && k !== 'discardLocal') throw new TmError(ErrorCodes.USAGE, `${parts[2]}: unknown option "${k}"`);
    if ((b.force !== undefined && typeof b.force !== 'boolean') || (b.discardLocal !== undefined && typeof b.discardLocal !== 'boolean')) throw new TmError(ErrorCodes.USAGE, `${parts[2]}: options must be booleans`);
    return { result: await h(parts[1]!, parts[2] as RoleAction, { force: b.force === true, discardLocal: b.discardLocal === true }) };
  });
  return true;
}

/**
 * Drills through the control socket:
 * - `POST /mirrors/MIRROR/drills` with `{"name": NAME}` or `{}`: 201 `{drill: DrillStarted}`;
 * - `GET /drills`: 200 `{drills: DrillInfo[]}` (every running secondary's);
 * - `DELETE /mirrors/MIRROR/drills/NAME[?force=1]`: 200 `{drill: DrillStopped}`.
 * A refusal answers `{error: {code, message}}` with 400 (TM_ERR_USAGE), 404
 * (no such mirror or drill), 409 (busy, exists, unsupported, state) or 500.
 */
export interface DrillHandlers {
  start(mirror: string, name?: string): Promise<DrillStarted>;
  list(): Promise<DrillInfo[]>;
  stop(mirror: string, name: string, force: boolean): Promise<DrillStopped>;
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

/** The HTTP status of a refusal with `code`. */
export function httpStatusOf(code: ErrorCode): number {
  if (code === ErrorCodes.USAGE) return 400;
  if (code === ErrorCodes.UNKNOWN_MIRROR || code === ErrorCodes.DRILL_UNKNOWN) return 404;
  if (
    code === ErrorCodes.DRILL_BUSY ||
    code === ErrorCodes.DRILL_EXISTS ||
    code === ErrorCodes.DRILL_UNSUPPORTED ||
    code === ErrorCodes.STATE ||
    code === ErrorCodes.CONSISTENCY ||
    code === ErrorCodes.ROLE ||
    code === ErrorCodes.PEER_CONNECTED ||
    code === ErrorCodes.SPLIT_BRAIN
  )
    return 409;
  return 500;
}

/** Answer `status` with what `work` resolves to, or the coded error it rejects with. */
function answer(res: http.ServerResponse, status: number, work: () => Promise<unknown>): void {
  work().then(
    (body) => sendJson(res, status, body),
    (e) => {
      const err = asTmError(e);
      sendJson(res, httpStatusOf(err.code), { error: err.toJSON() });
    },
  );
}

/** A request's JSON body (at most 64 KiB; empty is `{}`). */
async function jsonBody(req: http.IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of req as AsyncIterable<Buffer>) {
    n += c.length;
    if (n > 65536) throw new TmError(ErrorCodes.USAGE, 'request body over 64 KiB');
    chunks.push(c);
  }
  const text = Buffer.concat(chunks).toString('utf8').trim();
  if (!text) return {};
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw new TmError(ErrorCodes.USAGE, 'request body is not JSON');
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new TmError(ErrorCodes.USAGE, 'request body must be a JSON object');
  return v as Record<string, unknown>;
}

/** Serve a drill route (see {@link DrillHandlers}); false when `req` is not one. */
function serveDrills(req: http.IncomingMessage, res: http.ServerResponse, h: DrillHandlers): boolean {
  const url = new URL(req.url ?? '/', 'http://localhost');
  let parts: string[];
  try {
    parts = url.pathname.split('/').filter(Boolean).map(decodeURIComponent);
  } catch {
    return false;
  }
  if (req.method === 'GET' && parts.length === 1 && parts[0] === 'drills') {
    answer(res, 200, async () => ({ drills: await h.list() }));
    return true;
  }
  if (parts[0] !== 'mirrors' || parts[2] !== 'drills') return false;
  const mirror = parts[1]!;
  if (req.method === 'POST' && parts.length === 3) {
    answer(res, 201, async () => {
      const b = await jsonBody(req);
      if (b.name !== undefined && typeof b.name !== 'string') throw new TmError(ErrorCodes.USAGE, 'drill start: "name" must be a string');
      return { drill: await h.start(mirror, b.name) };
    });
    return true;
  }
  if (req.method === 'DELETE' && parts.length === 4) {
    const force = ['1', 'true', ''].includes(url.searchParams.get('force') ?? 'no');
    answer(res, 200, async () => ({ drill: await h.stop(mirror, parts[3]!, force) }));
    return true;
  }
  return false;
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
    if (handlers.drills && serveDrills(req, res, handlers.drills)) return;
    if (handlers.roles && serveRoles(req, res, handlers.roles)) return;
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
  return controlHttp(stateDir, 'GET', urlPath, undefined, timeoutMs);
}

/**
 * An action on a daemon's control socket (`method` with `body` as JSON): the
 * parsed JSON answer, or the coded error the daemon answered with, thrown as
 * a TmError of that code.
 */
export async function controlCall<T>(stateDir: string, method: 'GET' | 'POST' | 'DELETE', urlPath: string, body?: unknown, timeoutMs = 60_000): Promise<T> {
  const r = await controlHttp(stateDir, method, urlPath, body === undefined ? undefined : JSON.stringify(body), timeoutMs);
  let v: unknown;
  try {
    v = JSON.parse(r.body);
  } catch (e) {
    throw new TmError(ErrorCodes.CONTROL, `control socket ${controlSocketPath(stateDir)} answered ${r.statusCode} with something that is not JSON`, { cause: e });
  }
  const err = (v as { error?: { code?: unknown; message?: unknown } } | null)?.error;
  if (r.statusCode >= 400) {
    const code = typeof err?.code === 'string' && err.code.startsWith('TM_ERR_') ? (err.code as ErrorCode) : ErrorCodes.CONTROL;
    throw new TmError(code, typeof err?.message === 'string' ? err.message : `${method} ${urlPath}: HTTP ${r.statusCode}`);
  }
  return v as T;
}

function controlHttp(stateDir: string, method: string, urlPath: string, body: string | undefined, timeoutMs: number): Promise<{ statusCode: number; contentType: string; body: string }> {
  const sock = controlSocketPath(stateDir);
  return new Promise((resolve, reject) => {
    const headers = body === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) };
    const req = http.request({ socketPath: sock, path: urlPath, method, headers, timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ statusCode: res.statusCode ?? 0, contentType: String(res.headers['content-type'] ?? ''), body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', (e: NodeJS.ErrnoException) => {
      const hint = e.code === 'ENOENT' || e.code === 'ECONNREFUSED' ? ' (is the daemon running with this config?)' : '';
      reject(new TmError(ErrorCodes.CONTROL, `cannot reach the daemon at ${sock}: ${e.message}${hint}`, { cause: e }));
    });
    req.end(body);
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
