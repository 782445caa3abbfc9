import { promises as fsp } from 'node:fs';
import * as path from 'node:path';

/** The filesystem a path is on, for messages: its type, what is mounted and where. */
export interface FilesystemInfo {
  /** e.g. `xfs`, `ext4`, `btrfs`, `tmpfs`. */
  type: string;
  /** The mount point of that filesystem holding the path. */
  mountPoint: string | null;
  /** What is mounted there (`/dev/vdb1`, `/dev/loop3`), or null. */
  source: string | null;
}

/** statfs f_type magic numbers of the filesystems a message is likely to name. */
const MAGIC: Record<number, string> = {
  0x58465342: 'xfs',
  0xef53: 'ext2/3/4',
  0x9123683e: 'btrfs',
  0x01021994: 'tmpfs',
  0x794c7630: 'overlay',
  0x6969: 'nfs',
  0x2fc12fc1: 'zfs',
  0xf2f52010: 'f2fs',
  0x65735546: 'fuse',
};

/**
 * Which filesystem `file` (or, when it does not exist, its directory) is on:
 * the entry of /proc/self/mountinfo with the file's device number (the
 * longest mount point above the file when several share it, e.g. bind
 * mounts), else statfs's type number. Never throws: an unknown filesystem is
 * `{ type: 'unknown' }`.
 */
export async function filesystemOf(file: string, mountinfo = '/proc/self/mountinfo'): Promise<FilesystemInfo> {
  let p = path.resolve(file);
  let st;
  for (;;) {
    try {
      st = await fsp.stat(p, { bigint: true });
      break;
    } catch {
      const up = path.dirname(p);
      if (up === p) return { type: 'unknown', mountPoint: null, source: null };
      p = up;
    }
  }
  const real = await fsp.realpath(p).catch(() => p);
  const want = `${devMajor(st.dev)}:${devMinor(st.dev)}`;
  const text = await fsp.readFile(mountinfo, 'utf8').catch(() => '');
  let best: FilesystemInfo | null = null;
  for (const line of text.split('\n')) {
    const m = parseMountinfo(line);
    if (!m || m.device !== want || !within(real, m.mountPoint)) continue;
    if (!best || m.mountPoint.length > best.mountPoint!.length) best = { type: m.type, mountPoint: m.mountPoint, source: m.source };
  }
  if (best) return best;
  try {
    const s = await fsp.statfs(p);
    return { type: MAGIC[s.type] ?? `0x${s.type.toString(16)}`, mountPoint: null, source: null };
  } catch {
    return { type: 'unknown', mountPoint: null, source: null };
  }
}

/** "xfs (/dev/loop3 on /mnt/replica)". */
export function describeFilesystem(f: FilesystemInfo): string {
  const where = [f.source, f.mountPoint && `on ${f.mountPoint}`].filter(Boolean).join(' ');
  return where ? `${f.type} (${where})` : f.type;
}

/** Linux dev_t encoding (glibc gnu_dev_major / gnu_dev_minor). */
function devMajor(dev: bigint): bigint {
  return ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
}
function devMinor(dev: bigint): bigint {
  return (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
}

function within(p: string, mountPoint: string): boolean {
  return mountPoint === '/' || p === mountPoint || p.startsWith(mountPoint + '/');
}

/** One line of mountinfo: `id parent major:minor root mountpoint opts [optional...] - type source superopts`. */
export function parseMountinfo(line: string): { device: string; mountPoint: string; type: string; source: string } | null {
  const f = line.split(' ');
  const dash = f.indexOf('-', 6);
  if (f.length < 10 || dash < 0 || dash + 2 >= f.length) return null;
  return { device: f[2]!, mountPoint: unescape(f[4]!), type: f[dash + 1]!, source: unescape(f[dash + 2]!) };
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescape(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}
