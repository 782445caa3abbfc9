#!/usr/bin/env node
// What `npm test` needs from the system, checked once before anything is
// built or run (package.json "test"): root, the programs the tests run, loop
// devices, the native addon. On a miss it prints ONE line (what is missing,
// the apt-get command that installs everything the tests use, and that root
// is needed) on stderr and exits 1, instead of a score of failing tests.
// The same package list is in README.md (quick start) and .ci/run, which
// test/unit/prerequisites.test.ts keeps in step.
//
//   node test/helpers/prerequisites.mjs             check; silent when all is there
//   node test/helpers/prerequisites.mjs --apt-line  print the apt-get command
import { accessSync, constants, existsSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Debian packages the build and the tests need, in the order README.md lists them. */
export const APT_PACKAGES = ['python3', 'make', 'g++', 'coreutils', 'util-linux', 'mount', 'e2fsprogs', 'xfsprogs', 'btrfs-progs', 'thin-provisioning-tools', 'openssl', 'systemd', 'fio'];

/** Programs the tests run, each with the package that has it. */
export const TOOLS = [
  ['mkfs.xfs', 'xfsprogs'], // loop-mounted XFS (reflink=1): reflink tracking, drills, consistency
  ['mkfs.btrfs', 'btrfs-progs'],
  ['mkfs.ext4', 'e2fsprogs'], // journal consistency, drills refused on ext4
  ['e2fsck', 'e2fsprogs'],
  ['losetup', 'util-linux'], // loop devices, block-device volumes
  ['setpriv', 'util-linux'], // drill: a process that holds a clone
  ['mount', 'mount'],
  ['umount', 'mount'],
  ['thin_restore', 'thin-provisioning-tools'], // lvm-thin metadata fixtures
  ['thin_dump', 'thin-provisioning-tools'],
  ['thin_delta', 'thin-provisioning-tools'],
  ['openssl', 'openssl'], // test CA and certificates (TLS)
  ['systemd-analyze', 'systemd'], // the unit file is verified
  ['python3', 'python3'], // NOTIFY_SOCKET receiver (sd_notify)
  ['truncate', 'coreutils'],
  ['sync', 'coreutils'],
  ['fio', 'fio'], // the RPO test's writer (sustained random writes)
];

export const APT_LINE = `apt-get install -y ${APT_PACKAGES.join(' ')}`;

/** `cmd` is an executable file in one of the PATH directories. */
function onPath(cmd, envPath) {
  for (const dir of (envPath ?? '').split(path.delimiter)) {
    if (!dir) continue;
    try {
      accessSync(path.join(dir, cmd), constants.X_OK);
      return true;
    } catch {
      /* not here */
    }
  }
  return false;
}

/**
 * What is missing, as short phrases (empty: all is there). `o.root` is the
 * package's directory (for the native addon), `o.env` the environment whose
 * PATH is searched, `o.uid` the user id.
 */
export function missingPrerequisites(o = {}) {
  const env = o.env ?? process.env;
  const uid = o.uid ?? process.getuid?.();
  const root = o.root ?? path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
  const missing = [];
  if (uid !== 0) missing.push('root (the tests mount loop devices)');
  const tools = TOOLS.filter(([cmd]) => !onPath(cmd, env.PATH)).map(([cmd]) => cmd);
  if (tools.length > 0) missing.push(tools.join(', '));
  if (!existsSync(o.loopControl ?? '/dev/loop-control')) missing.push('loop devices (/dev/loop-control: modprobe loop)');
  if (!existsSync(path.join(root, 'build', 'Release', 'thinmirror_native.node'))) missing.push('the native addon (run npm install)');
  return missing;
}

/** The one line printed when something is missing. */
export function prerequisitesLine(missing) {
  return `npm test cannot run: missing ${missing.join('; ')}. On Debian, as root: ${APT_LINE}; then run npm test as root.`;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  if (process.argv.includes('--apt-line')) {
    console.log(APT_LINE);
  } else {
    const missing = missingPrerequisites();
    if (missing.length > 0) {
      console.error(prerequisitesLine(missing));
      process.exit(1);
    }
  }
}
