import { spawn, type ChildProcess } from 'node:child_process';
import { openSync, closeSync, readFileSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCodes, TmError } from '../errors.js';
import { controlRequest, type DaemonStatus } from '../daemon/control.js';
import type { MirrorStatus } from '../mirror/status.js';

/** The package's dist/cli.js, from dist/cli/ or (under tsx) from src/cli/. */
export function cliPath(): string {
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'dist', 'cli.js');
}

/**
 * A thinmirror daemon run as a child process (`cli.js run --config FILE`),
 * with its output in a log file, watched through its control socket. Used by
 * the demo, the integration tests and the benchmark.
 */
export class DaemonProcess {
  readonly child: ChildProcess;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private exitInfo: { code: number | null; signal: NodeJS.Signals | null } | null = null;

  constructor(
    readonly configPath: string,
    readonly stateDir: string,
    readonly logFile: string,
    extraArgs: string[] = [],
    /** Variables added to the child's environment (e.g. test-only switches). */
    env: Record<string, string> = {},
    /** A command the daemon runs under, which execs it (e.g. `ip netns exec NS`; the bench's shaped link). */
    wrap: string[] = [],
  ) {
    const fd = openSync(logFile, 'a');
    try {
      // TM_DAEMON_NODE_ARGS: extra node options for the child (e.g. --cpu-prof when profiling).
      const nodeArgs = (process.env.TM_DAEMON_NODE_ARGS ?? '').split(' ').filter(Boolean);
      const [cmd, ...args] = [...wrap, process.execPath, ...nodeArgs, cliPath(), 'run', '--config', configPath, ...extraArgs];
      this.child = spawn(cmd!, args, {
        stdio: ['ignore', fd, fd],
        env: { ...process.env, ...env },
      });
    } finally {
      closeSync(fd);
    }
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code, signal) => {
        this.exitInfo = { code, signal };
        resolve(this.exitInfo);
      });
    });
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get running(): boolean {
    return this.exitInfo === null;
  }

  /** Last lines of the daemon's log, for error messages. */
  logTail(lines = 20): string {
    try {
      return readFileSync(this.logFile, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
    } catch {
      return '(no log)';
    }
  }

  status(): Promise<DaemonStatus> {
    return controlRequest<DaemonStatus>(this.stateDir, '/status', 2000);
  }

  async mirror(name: string): Promise<MirrorStatus> {
    const st = await this.status();
    const m = st.mirrors.find((x) => x.name === name);
    if (!m) throw new TmError(ErrorCodes.INTERNAL, `daemon ${this.configPath} has no mirror ${name}`);
    return m;
  }

  /** Poll status until `pred` holds; fails early if the process exits. */
  async waitFor(pred: (s: DaemonStatus) => boolean, timeoutMs: number, what: string, intervalMs = 100): Promise<DaemonStatus> {
    const deadline = Date.now() + timeoutMs;
    let last: DaemonStatus | undefined;
    let lastErr: unknown;
    while (Date.now() < deadline) {
      if (!this.running) {
        throw new TmError(ErrorCodes.INTERNAL, `daemon ${this.configPath} exited (${JSON.stringify(this.exitInfo)}) while waiting for ${what}:\n${this.logTail()}`);
      }
      try {
        last = await this.status();
        if (pred(last)) return last;
      } catch (e) {
        lastErr = e;
      }
      await new Promise((r) => setTimeout(r, intervalMs));
    }
    throw new TmError(
      ErrorCodes.TIMEOUT,
      `timed out after ${timeoutMs} ms waiting for ${what}; last status: ${JSON.stringify(last?.mirrors ?? (lastErr as Error)?.message)}\n${this.logTail()}`,
    );
  }

  waitReady(timeoutMs = 15000): Promise<DaemonStatus> {
    return this.waitFor(() => true, timeoutMs, 'the control socket');
  }

  kill(signal: NodeJS.Signals = 'SIGKILL'): void {
    if (this.running) this.child.kill(signal);
  }

  /** SIGTERM, then SIGKILL after `graceMs`; resolves with the exit info. */
  async stop(graceMs = 10000): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (!this.running) return this.exitInfo!;
    this.child.kill('SIGTERM');
    const t = setTimeout(() => this.kill('SIGKILL'), graceMs);
    const info = await this.exited;
    clearTimeout(t);
    return info;
  }
}
