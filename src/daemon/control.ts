import * as http from 'node:http';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import type { MirrorStatus } from '../mirror/status.js';

export const CONTROL_SOCKET = 'control.sock';

export interface DaemonStatus {
  node: string;
  pid: number;
  version: string;
  startedAt: string;
  listen: { host: string; port: number } | null;
  mirrors: MirrorStatus[];
}

export function controlSocketPath(stateDir: string): string {
  return path.join(stateDir, CONTROL_SOCKET);
}

/**
 * HTTP over a unix socket in the state directory, mode 0600 (root or the
 * daemon's user only). GET /status answers JSON.
 */
export async function startControlServer(stateDir: string, getStatus: () => Promise<DaemonStatus>): Promise<http.Server> {
  const sock = controlSocketPath(stateDir);
  // We hold the state directory's lock, so a socket file here is a leftover.
  await fsp.rm(sock, { force: true });
  const server = http.createServer((req, res) => {
    const send = (code: number, body: unknown) => {
      res.writeHead(code, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body, null, 2) + '\n');
    };
    if (req.method === 'GET' && req.url === '/status') {
      getStatus().then(
        (st) => send(200, st),
        (e) => send(500, { error: asTmError(e).toJSON() }),
      );
      return;
    }
    send(404, { error: { code: ErrorCodes.USAGE, message: `no such endpoint: ${req.method} ${req.url}` } });
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

/** GET a path from a daemon's control socket and parse the JSON answer. */
export function controlRequest<T>(stateDir: string, urlPath: string, timeoutMs = 5000): Promise<T> {
  const sock = controlSocketPath(stateDir);
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath: sock, path: urlPath, method: 'GET', timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        try {
          resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')) as T);
        } catch (e) {
          reject(new TmError(ErrorCodes.CONTROL, `control socket ${sock} answered something that is not JSON`, { cause: e }));
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', (e: NodeJS.ErrnoException) => {
      const hint = e.code === 'ENOENT' || e.code === 'ECONNREFUSED' ? ' (is the daemon running with this config?)' : '';
      reject(new TmError(ErrorCodes.CONTROL, `cannot reach the daemon at ${sock}: ${e.message}${hint}`, { cause: e }));
    });
    req.end();
  });
}
