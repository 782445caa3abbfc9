import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { pino } from 'pino';
import { ErrorCodes, TmError } from '../../src/errors.js';
import { Mirror, serveSession } from '../../src/mirror/mirror.js';
import type { MirrorConfig } from '../../src/mirror/settings.js';
import type { MirrorState } from '../../src/mirror/state.js';
import { readJsonFile, writeFileAtomic } from '../../src/util/atomic.js';
import type { MirrorStatus } from '../../src/mirror/status.js';
import { MemoryVolume } from '../../src/volume/memory.js';
import { memorySessionPair, type FrameAction } from '../../src/wire/memory.js';
import type { Session } from '../../src/wire/session.js';

/** The pre-shared key both sides of a MemoryMirrorPair use (a fake peer authenticates with it too). */
export const PSK = Buffer.from('memory-pair-pre-shared-key-0123456789');
let serial = 0;

/** Settings small enough that a few MiB make many extents, checkpoints and cycles. */
export function memoryMirrorConfig(name: string, role: 'primary' | 'secondary', volume: string, o: Partial<MirrorConfig> = {}): MirrorConfig {
  return {
    name,
    role,
    volume,
    ...(role === 'primary' ? { peer: 'ws://memory.invalid:1' } : {}),
    insecure: false,
    chunkSize: 4096,
    maxInFlight: 256 * 1024,
    maxExtent: 64 * 1024,
    checkpointBytes: 512 * 1024,
    checkpointInterval: 60,
    reconnectMin: 0.005,
    reconnectMax: 0.02,
    tracking: { mode: 'scan', interval: 0.02 },
    consistency: 'auto',
    ...o,
  };
}

/**
 * A primary and a secondary Mirror in this process over MemoryVolumes and
 * in-memory sessions: no sockets, no processes. State files live in a temp
 * dir (removed by {@link cleanup}). Either side can be restarted (a new Mirror
 * on the same state, as after a crash), and `onFrame` sees every frame the
 * primary's sessions carry, numbered across sessions, to cut the link or
 * restart a side at chosen frames.
 */
export class MemoryMirrorPair {
  primary: Mirror | null = null;
  secondary: Mirror | null = null;
  readonly source: MemoryVolume;
  readonly target: MemoryVolume;
  /** Frames sent by either side over all sessions so far. */
  framesSeen = 0;
  /** Data payload bytes applied by secondaries that have ended (a restart starts its counter at 0). */
  appliedByEnded = 0;
  /** Data payload bytes sent by primaries that have ended. */
  sentByEnded = 0;
  /** `frame`: the bytes as sent (MAC tag included); it must not be kept (see memory.ts). */
  onFrame: ((index: number, from: 'a' | 'b', frame: Buffer) => FrameAction) | null = null;
  /**
   * Save faults per site (a: began as primary, b: as secondary): a save of
   * state.json whose new content `fail` returns true for is refused
   * (TM_ERR_STATE) and leaves the file as it was. Counted in `savesFailed`.
   */
  readonly saveFaults: { a: ((next: MirrorState) => boolean) | null; b: ((next: MirrorState) => boolean) | null } = { a: null, b: null };
  savesFailed = 0;
  /**
   * A fake secondary: when set, a primary's session goes to it instead of the
   * secondary Mirror (it gets the secondary's end of the link, before the
   * handshake). Tests of a malicious secondary set it.
   */
  peer: ((session: Session) => Promise<void>) | null = null;
  /** Sites started without a way to reach the other side (no connect, no listener): a one-way config. */
  readonly oneWay = new Set<'a' | 'b'>();
  private readonly log = pino({ level: process.env.TM_TEST_LOG ?? 'silent' });

  private constructor(
    readonly dir: string,
    readonly name: string,
    readonly sourceName: string,
    readonly targetName: string,
    size: number,
    readonly configs: { primary: MirrorConfig; secondary: MirrorConfig },
  ) {
    this.source = MemoryVolume.create(size, { path: sourceName });
    MemoryVolume.register(sourceName.slice('memory:'.length), this.source);
    this.target = MemoryVolume.create(size, { path: targetName });
    MemoryVolume.register(targetName.slice('memory:'.length), this.target);
  }

  /** `base`: where the temp dir of the state files goes (default the OS temp dir; the fuzzer uses /dev/shm). */
  static async create(size: number, o: { primary?: Partial<MirrorConfig>; secondary?: Partial<MirrorConfig>; base?: string } = {}): Promise<MemoryMirrorPair> {
    const dir = await fsp.mkdtemp(path.join(o.base ?? os.tmpdir(), 'tm-mem-'));
    const id = `${process.pid}-${++serial}`;
    const src = `memory:src-${id}`;
    const dst = `memory:dst-${id}`;
    return new MemoryMirrorPair(dir, 'vm1', src, dst, size, {
      primary: memoryMirrorConfig('vm1', 'primary', src, o.primary),
      secondary: memoryMirrorConfig('vm1', 'secondary', dst, o.secondary),
    });
  }

  get primaryState(): string {
    return path.join(this.dir, 'state-a');
  }

  get secondaryState(): string {
    return path.join(this.dir, 'state-b');
  }

  /** Start the side that began as secondary (site-b) on its state. */
  startSecondary(): Promise<Mirror> {
    return this.startSide('secondary');
  }

  /** Start the side that began as primary (site-a) on its state. */
  startPrimary(): Promise<Mirror> {
    return this.startSide('primary');
  }

  private async startSide(side: 'primary' | 'secondary'): Promise<Mirror> {
    const a = side === 'primary';
    const m = new Mirror(this.configs[side], {
      nodeName: a ? 'site-a' : 'site-b',
      stateDir: a ? this.primaryState : this.secondaryState,
      psk: PSK,
      log: this.log.child({ side: a ? 'a' : 'b' }),
      writeState: async (file, data) => {
        const fail = this.saveFaults[a ? 'a' : 'b'];
        if (fail && fail(JSON.parse(data) as MirrorState)) {
          this.savesFailed++;
          throw new TmError(ErrorCodes.STATE, `writing ${file}: injected failure`);
        }
        await writeFileAtomic(file, data);
      },
      // Whichever side is primary (after a role change too) connects to the other one;
      // a one-way site (oneWay) has no way to reach the other, as a config without peer: / listen:.
      ...(this.oneWay.has(a ? 'a' : 'b')
        ? { listening: false }
        : { connect: async (signal: AbortSignal) => (a ? this.connect(this.secondary, 'site-b', signal) : this.connect(this.primary, 'site-a', signal)) }),
    });
    // Known before it starts: a fault planned at its first frame restarts this one, not none.
    if (a) this.primary = m;
    else this.secondary = m;
    await m.start();
    return m;
  }

  /** What a primary's transport would do: a session to the other side's Mirror, served as the daemon serves one. */
  private async connect(secondary: Mirror | null, node: string, signal: AbortSignal) {
    signal.throwIfAborted();
    if (this.peer) {
      const fake = memorySessionPair({ names: ['secondary (fake)', 'primary (memory)'] });
      const cut = () => fake.cut();
      signal.addEventListener('abort', cut, { once: true });
      void fake.a.closed.then(() => signal.removeEventListener('abort', cut));
      void this.peer(fake.b).catch(() => {});
      return fake.a;
    }
    if (!secondary) throw new TmError(ErrorCodes.CONNECTION, `cannot connect to ${node}: its mirror is not running`);
    const pair = memorySessionPair({
      names: ['secondary (memory)', 'primary (memory)'],
      onFrame: (from, _index, frame) => (this.onFrame ? this.onFrame(this.framesSeen++, from, frame) : (this.framesSeen++, 'pass')),
    });
    // As the transport does: stopping the connecting side drops the connection.
    signal.addEventListener('abort', () => pair.cut(), { once: true });
    void serveSession(pair.b, { node, psk: PSK, log: this.log, mirror: (n) => (n === secondary.name ? secondary : undefined) });
    return pair.a;
  }

  /** Stop (or abort, as close to a crash as this process allows) and start a side again on its state. */
  async restart(side: 'primary' | 'secondary', abort = true): Promise<void> {
    if (side === 'primary') {
      const m = this.primary;
      this.primary = null;
      if (m) {
        await (abort ? m.abort() : m.stop());
        this.sentByEnded += (await m.status()).sentBytes;
      }
      await this.startPrimary();
    } else {
      const m = this.secondary;
      this.secondary = null;
      if (m) {
        await (abort ? m.abort() : m.stop());
        this.appliedByEnded += (await m.status()).appliedBytes;
      }
      await this.startSecondary();
    }
  }

  /** The state.json of a site's mirror as it is on disk. */
  async stateOnDisk(site: 'a' | 'b'): Promise<MirrorState> {
    const s = await readJsonFile<MirrorState>(path.join(site === 'a' ? this.primaryState : this.secondaryState, this.name, 'state.json'));
    if (!s) throw new Error(`no state.json on site ${site}`);
    return s;
  }

  /** Payload bytes sent over every primary so far. */
  async sentBytes(): Promise<number> {
    return this.sentByEnded + (this.primary ? (await this.primary.status()).sentBytes : 0);
  }

  /** Payload bytes applied to the target over every secondary so far. */
  async appliedBytes(): Promise<number> {
    return this.appliedByEnded + (this.secondary ? (await this.secondary.status()).appliedBytes : 0);
  }

  /** Poll the primary's status until `done` holds (or fail after `timeoutMs`, naming `what` and the last status). */
  waitPrimary(done: (s: MirrorStatus) => boolean, what: string, timeoutMs = 20_000): Promise<MirrorStatus> {
    return this.waitFor(() => this.primary, done, what, timeoutMs);
  }

  /** Poll the status of the mirror `which` gives until `done` holds. */
  async waitFor(which: () => Mirror | null, done: (s: MirrorStatus) => boolean, what: string, timeoutMs = 20_000): Promise<MirrorStatus> {
    const deadline = Date.now() + timeoutMs;
    let last: MirrorStatus | null = null;
    for (;;) {
      const m = which();
      if (m) {
        last = await m.status();
        if (done(last)) return last;
      }
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last primary status: ${JSON.stringify(last)}`);
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  /** Wait until generation `gen` (at least) is committed and the primary is in sync. */
  waitCommitted(gen: number, timeoutMs?: number): Promise<MirrorStatus> {
    return this.waitPrimary((s) => s.committedGeneration >= gen && s.state === 'in-sync', `generation ${gen} committed`, timeoutMs);
  }

  async cleanup(): Promise<void> {
    await Promise.all([this.primary?.abort(), this.secondary?.abort()]);
    MemoryVolume.unregister(this.sourceName.slice('memory:'.length));
    MemoryVolume.unregister(this.targetName.slice('memory:'.length));
    await fsp.rm(this.dir, { recursive: true, force: true });
  }
}
