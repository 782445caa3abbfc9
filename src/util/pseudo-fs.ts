import { promises as fsp } from 'node:fs';
import * as path from 'node:path';

/**
 * Filesystems whose files are kernel interfaces, not storage: a state
 * directory there cannot hold files, and `mkdir -p` under /proc even loops
 * forever in Node (mkdir of a child fails ENOENT, of the parent EEXIST, and
 * it starts over). Keyed by statfs f_type (linux/magic.h).
 */
const PSEUDO_FS = new Map<number, string>([
  [0x9fa0, 'proc'],
  [0x62656572, 'sysfs'],
  [0x64626720, 'debugfs'],
  [0x74726163, 'tracefs'],
  [0x73636673, 'securityfs'],
  [0x27e0eb, 'cgroup'],
  [0x63677270, 'cgroup2'],
  [0x1cd1, 'devpts'],
  [0xcafe4a11, 'bpf'],
  [0x6165676c, 'pstore'],
  [0xde5e81e4, 'efivarfs'],
  [0x62656570, 'configfs'],
  [0x65735543, 'fusectl'],
  [0x42494e4d, 'binfmt_misc'],
  [0x19800202, 'mqueue'],
  [0x6e736673, 'nsfs'],
  [0xf97cff8c, 'selinuxfs'],
  [0x43415d53, 'smackfs'],
  [0x958458f6, 'hugetlbfs'],
]);

/** The name of a pseudo-filesystem f_type, or null for any other (an unknown type is taken for storage). */
export function pseudoFsName(type: number): string | null {
  return PSEUDO_FS.get(type >>> 0) ?? null;
}

/**
 * The pseudo-filesystem `dir` is on (or would be created on: the nearest
 * ancestor that exists is asked), e.g. 'proc' for /proc/x/y; null when it is
 * on any other filesystem, or when nothing along the path can be asked.
 */
export async function pseudoFsOf(dir: string): Promise<string | null> {
  let p = path.resolve(dir);
  for (;;) {
    try {
      return pseudoFsName((await fsp.statfs(p)).type);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      const parent = path.dirname(p);
      if ((code !== 'ENOENT' && code !== 'ENOTDIR') || parent === p) return null;
      p = parent;
    }
  }
}
