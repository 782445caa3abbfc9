import { fork } from 'node:child_process';
import * as os from 'node:os';
import { fileURLToPath } from 'node:url';
import { WebSocket } from 'ws';
import { mapBomb } from './raw-ws.js';

/**
 * Attackers without the key (issue 14 §1): `connections` WebSockets to a
 * listener, each sending one frame (by default 8 MiB of millions of empty maps)
 * as soon as it is open, and opening a new connection as soon as the listener
 * has closed the last one, until {@link stop}. Connections come from
 * `addresses` in turn (any 127.x.y.z works on Linux loopback), so that a
 * per-address bound does not turn the attack away at the TCP accept.
 */
export class PreauthAttack {
  readonly counters = { opened: 0, framesSent: 0, failed: 0 };
  private stopped = false;
  private readonly live = new Set<WebSocket>();
  private readonly loops: Promise<void>[] = [];

  constructor(
    readonly url: string,
    readonly o: { connections: number; addresses: string[]; frame?: Buffer },
  ) {}

  start(): this {
    const frame = this.o.frame ?? mapBomb();
    for (let i = 0; i < this.o.connections; i++) this.loops.push(this.loop(this.o.addresses[i % this.o.addresses.length]!, frame));
    return this;
  }

  /** Connections open right now. */
  get open(): number {
    return this.live.size;
  }

  private async loop(localAddress: string, frame: Buffer): Promise<void> {
    while (!this.stopped) {
      await new Promise<void>((resolve) => {
        const ws = new WebSocket(this.url, { localAddress, perMessageDeflate: false, generateMask: (m: Buffer) => void m.fill(0) });
        this.live.add(ws);
        ws.on('open', () => {
          this.counters.opened++;
          ws.send(frame, { binary: true }, () => {});
          this.counters.framesSent++;
        });
        ws.on('error', () => this.counters.failed++);
        ws.on('close', () => {
          this.live.delete(ws);
          resolve();
        });
      });
    }
  }

  /** Stop attacking: every connection terminated, every loop ended. */
  async stop(): Promise<void> {
    this.stopped = true;
    for (const ws of this.live) ws.terminate();
    await Promise.all(this.loops);
  }
}

/**
 * The same attack from a child process (at CPU priority `nice`, default 0),
 * so that it does not compete with the test's own event loop. `stop()` ends it
 * and returns its counters.
 */
export function attackFromChild(url: string, o: { connections: number; addresses: string[]; nice?: number }): { stop(): Promise<PreauthAttack['counters']> } {
  const child = fork(fileURLToPath(new URL('./preauth-attack-child.ts', import.meta.url)), [url, String(o.connections), o.addresses.join(',')], {
    execArgv: ['--import', 'tsx'],
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  if (child.pid && o.nice) os.setPriority(child.pid, o.nice);
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  let stopping: Promise<PreauthAttack['counters']> | null = null;
  return {
    stop() {
      stopping ??= new Promise<PreauthAttack['counters']>((resolve, reject) => {
        child.once('message', (m) => resolve(m as PreauthAttack['counters']));
        child.once('exit', (code) => reject(new Error(`the attacking process exited (${code}) before reporting`)));
        child.send('stop');
      }).finally(() => exited);
      return stopping;
    },
  };
}
