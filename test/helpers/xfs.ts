import { execFileSync } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

/** Fail (never skip) when a command is missing, saying what to install. */
export function requireTool(cmd: string, pkg: string): void {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'pipe' });
  } catch {
    throw new Error(`this test needs \`${cmd}\`: apt-get install -y ${pkg}`);
  }
}

/**
 * A filesystem on a loop device mounted in a temp dir (root only). XFS gets
 * reflink=1. `cleanup()` unmounts, detaches the loop device and removes the
 * image, also after a failed test; call it in after/afterEach.
 */
export class LoopFs {
  private constructor(
    readonly dir: string,
    readonly image: string,
    readonly mount: string,
    readonly device: string,
  ) {}

  static async create(fsType: 'xfs' | 'btrfs' | 'ext4', size = 1024 * 1024 * 1024): Promise<LoopFs> {
    const mkfs = `mkfs.${fsType}`;
    requireTool(mkfs, fsType === 'xfs' ? 'xfsprogs' : fsType === 'btrfs' ? 'btrfs-progs' : 'e2fsprogs');
    requireTool('losetup', 'mount');
    if (process.getuid?.() !== 0) throw new Error('this test needs root (loop devices and mount)');
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), `tm-${fsType}-`));
    const image = path.join(dir, 'fs.img');
    const mount = path.join(dir, 'mnt');
    await fsp.mkdir(mount);
    const fh = await fsp.open(image, 'w');
    await fh.truncate(size);
    await fh.close();
    let device = '';
    try {
      device = execFileSync('losetup', ['-f', '--show', image], { encoding: 'utf8' }).trim();
      const args = fsType === 'xfs' ? ['-q', '-f', '-m', 'reflink=1', device] : fsType === 'btrfs' ? ['-q', '-f', device] : ['-q', '-F', device];
      execFileSync(mkfs, args, { stdio: 'pipe' });
      execFileSync('mount', [device, mount], { stdio: 'pipe' });
    } catch (e) {
      if (device) execFileSync('losetup', ['-d', device], { stdio: 'ignore' });
      await fsp.rm(dir, { recursive: true, force: true });
      throw e;
    }
    return new LoopFs(dir, image, mount, device);
  }

  /** Unmount (lazily when busy), detach, delete. Never throws. */
  async cleanup(): Promise<void> {
    try {
      execFileSync('umount', [this.mount], { stdio: 'pipe' });
    } catch {
      try {
        execFileSync('umount', ['-l', this.mount], { stdio: 'pipe' });
      } catch {
        /* not mounted */
      }
    }
    try {
      execFileSync('losetup', ['-d', this.device], { stdio: 'pipe' });
    } catch {
      /* already detached */
    }
    await fsp.rm(this.dir, { recursive: true, force: true });
  }
}
