import { execFile as execFileCb, execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { cliPath } from '../../src/cli/daemon-process.js';
import type { Pair } from './pair.js';
import type { LoopFs } from './xfs.js';

/*
 * What the integration tests of drills and failover share: the CLI as an
 * operator runs it, loop-mounted filesystem images, and a writer of fsynced
 * files whose checksums the tests check in images taken later.
 */

const execFile = promisify(execFileCb);

/** The thinmirror CLI as an operator runs it (dist/cli.js): exit code, stdout, stderr; never throws on exit 1. */
export async function cli(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  try {
    const r = await execFile(process.execPath, [cliPath(), ...args], { encoding: 'utf8', timeout: 60_000 });
    return { code: 0, out: r.stdout, err: r.stderr };
  } catch (e) {
    const x = e as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof x.code === 'number' ? x.code : -1, out: x.stdout ?? '', err: x.stderr ?? '' };
  }
}

export const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** A filesystem image loop-mounted (`mount -o loop`: the loop device goes with the umount); umount() never throws. */
export class Mounted {
  constructor(readonly dir: string) {}
  static async mount(image: string, dir: string, opts = 'loop'): Promise<Mounted> {
    await fsp.mkdir(dir, { recursive: true });
    execFileSync('mount', ['-o', opts, image, dir], { stdio: 'pipe' });
    return new Mounted(dir);
  }
  umount(): void {
    try {
      execFileSync('umount', [this.dir], { stdio: 'pipe' });
    } catch {
      try {
        execFileSync('umount', ['-l', this.dir], { stdio: 'pipe' });
      } catch {
        /* not mounted */
      }
    }
  }
}

/** A file the writer made: its checksum, and the primary's generation read after its sync returned. */
export interface Written {
  name: string;
  sha: string;
  /** Every generation from `syncedBefore + 2` on was detected (its snapshot taken) after the file was synced. */
  syncedBefore: number;
}

/**
 * Creates files of random bytes in the primary's mounted ext4, each fsynced
 * with its directory, then notes the primary's generation. Never changes or
 * deletes a file, so a file present in an image must have its checksum.
 */
export class FileWriter {
  readonly files: Written[] = [];
  private stopped = false;
  private done: Promise<void> = Promise.resolve();
  constructor(
    private readonly dir: string,
    private readonly generation: () => Promise<number>,
  ) {}
  start(): void {
    this.done = this.run();
  }
  private async run(): Promise<void> {
    const dh = await fsp.open(this.dir, 'r');
    try {
      for (let i = 0; !this.stopped; i++) {
        const name = `f-${String(i).padStart(6, '0')}`;
        const data = randomBytes(16 * 1024 * (1 + Math.floor(Math.random() * 32)));
        const fh = await fsp.open(path.join(this.dir, name), 'wx');
        await fh.writeFile(data);
        await fh.sync();
        await fh.close();
        await dh.sync();
        const g = await this.generation().catch(() => null);
        if (g !== null) this.files.push({ name, sha: sha256(data), syncedBefore: g });
        await new Promise((r) => setTimeout(r, 40));
      }
    } finally {
      await dh.close();
    }
  }
  async stop(): Promise<void> {
    this.stopped = true;
    await this.done;
  }
}


/**
 * What an integration test of a site builds, torn down in reverse by
 * {@link Scene.cleanup} (call it in afterEach): the writer stopped, the images
 * unmounted, the daemons killed, the loop filesystem removed.
 */
export class Scene {
  fs: LoopFs | undefined;
  pair: Pair | undefined;
  writer: FileWriter | undefined;
  readonly mounts: Mounted[] = [];

  async mount(image: string, dir: string, opts?: string): Promise<Mounted> {
    const m = await Mounted.mount(image, dir, opts);
    this.mounts.push(m);
    return m;
  }

  unmount(m: Mounted): void {
    m.umount();
    this.mounts.splice(this.mounts.indexOf(m), 1);
  }

  async cleanup(): Promise<void> {
    await this.writer?.stop().catch(() => {});
    for (const m of this.mounts.splice(0).reverse()) m.umount();
    await this.pair?.cleanup();
    await this.fs?.cleanup();
    this.writer = undefined;
    this.pair = undefined;
    this.fs = undefined;
  }
}
