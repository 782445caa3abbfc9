import { promises as fsp } from 'node:fs';
import * as path from 'node:path';

/** Who keeps a file in use: a process with a descriptor on it, or a loop device backed by it. */
export type FileUser = { kind: 'process'; pid: number; command: string; fd: number } | { kind: 'loop'; device: string };

/** What {@link fileUsers} found, and how many processes it could not look into. */
export interface FileUsersReport {
  users: FileUser[];
  /**
   * Processes whose descriptors could not be read (EACCES/EPERM: another
   * user's process and no CAP_SYS_PTRACE, e.g. a systemd unit without it):
   * one of them may hold the file unseen.
   */
  uninspected: number;
}

/** Where the kernel's views are (tests point them elsewhere). */
export interface FileUsersOptions {
  /** procfs (default /proc). */
  proc?: string;
  /** sysfs block directory (default /sys/block). */
  sysBlock?: string;
}

/** Processes whose fd directories are read at once. */
const PARALLEL = 32;

/**
 * Everything that holds `file` open right now (Linux): every process with a
 * file descriptor on it (the /proc/PID/fd links, compared by device and inode,
 * so another path to the same file is found too) and every loop device whose
 * backing file it is (/sys/block/loopN/loop/backing_file: a loop device holds
 * the file in the kernel, without a descriptor any process could show).
 * Processes we may not look into (another user's, when not root) are skipped,
 * are counted in `uninspected`; processes that exit meanwhile are skipped.
 * Memory maps without a descriptor are not seen. Nothing when `file` does
 * not exist.
 */
export async function fileUsers(file: string, o: FileUsersOptions = {}): Promise<FileUsersReport> {
  let st;
  try {
    st = await fsp.stat(file, { bigint: true });
  } catch {
    return { users: [], uninspected: 0 };
  }
  const [procs, loops] = await Promise.all([processUsers(st.dev, st.ino, o.proc ?? '/proc'), loopUsers(await fsp.realpath(file), o.sysBlock ?? '/sys/block')]);
  return { users: [...procs.users, ...loops], uninspected: procs.uninspected };
}

/** The users as one phrase for messages: "pid 812 (qemu-system-x86) fd 14, loop device /dev/loop3". */
export function describeUsers(users: readonly FileUser[]): string {
  return users.map((u) => (u.kind === 'loop' ? `loop device ${u.device}` : `pid ${u.pid} (${u.command}) fd ${u.fd}`)).join(', ');
}

async function processUsers(dev: bigint, ino: bigint, proc: string): Promise<{ users: FileUser[]; uninspected: number }> {
  const pids = (await fsp.readdir(proc).catch(() => [] as string[])).filter((n) => /^\d+$/.test(n));
  const users: FileUser[] = [];
  let uninspected = 0;
  for (let i = 0; i < pids.length; i += PARALLEL) {
    const found = await Promise.all(pids.slice(i, i + PARALLEL).map((pid) => fdsOn(path.join(proc, pid), Number(pid), dev, ino)));
    for (const f of found) {
      if (f === 'denied') uninspected++;
      else users.push(...f);
    }
  }
  return { users, uninspected };
}

const denied = (e: unknown) => ['EACCES', 'EPERM'].includes((e as NodeJS.ErrnoException).code ?? '');

async function fdsOn(dir: string, pid: number, dev: bigint, ino: bigint): Promise<FileUser[] | 'denied'> {
  let fds: string[];
  try {
    fds = await fsp.readdir(path.join(dir, 'fd'));
  } catch (e) {
    return denied(e) ? 'denied' : []; // or gone
  }
  const hits: number[] = [];
  let refused = false;
  await Promise.all(
    fds.map(async (fd) => {
      try {
        // stat follows the magic link to the open file itself (no open, so a FIFO cannot block it).
        const s = await fsp.stat(path.join(dir, 'fd', fd), { bigint: true });
        if (s.dev === dev && s.ino === ino) hits.push(Number(fd));
      } catch (e) {
        if (denied(e)) refused = true; // else closed meanwhile
      }
    }),
  );
  if (hits.length === 0) return refused ? 'denied' : [];
  const command = (await fsp.readFile(path.join(dir, 'comm'), 'utf8').catch(() => '?')).trim();
  return hits.sort((a, b) => a - b).map((fd) => ({ kind: 'process' as const, pid, command, fd }));
}

async function loopUsers(real: string, sysBlock: string): Promise<FileUser[]> {
  const names = (await fsp.readdir(sysBlock).catch(() => [] as string[])).filter((n) => /^loop\d+$/.test(n));
  const out: FileUser[] = [];
  for (const n of names) {
    let backing: string;
    try {
      backing = (await fsp.readFile(path.join(sysBlock, n, 'loop', 'backing_file'), 'utf8')).replace(/\n$/, '');
    } catch {
      continue; // not bound to a file
    }
    // The kernel prints the path as it resolves it, " (deleted)" once unlinked.
    if (backing === real) out.push({ kind: 'loop', device: `/dev/${n}` });
  }
  return out.sort((a, b) => (a.kind === 'loop' && b.kind === 'loop' ? a.device.localeCompare(b.device, 'en', { numeric: true }) : 0));
}
