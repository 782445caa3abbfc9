import { promises as fsp } from 'node:fs';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { pseudoFsOf } from '../util/pseudo-fs.js';

/**
 * The node's state directory (`node.stateDir`): the daemon's own files at its
 * top, and one directory per mirror named after the mirror (`<name>/state.json`,
 * bitmaps, tracking state). A mirror's name must therefore never be one of
 * {@link STATE_DIR_FILES}, `.` or `..` (checked at config load).
 */

/** The control socket (GET /status, /metrics; drills). */
export const CONTROL_SOCKET = 'control.sock';
/** The pid lock that keeps two daemons off one state directory. */
export const LOCK_FILE = 'daemon.lock';
/**
 * Every fixed name the daemon keeps at the top of the state directory. Its
 * other entries are temp files, which start with `.`, and mirrors' directories.
 */
export const STATE_DIR_FILES: readonly string[] = [CONTROL_SOCKET, LOCK_FILE];

/**
 * Create the state directory (mode 0700) unless it exists. Refused with
 * TM_ERR_CONFIG when it is on a pseudo-filesystem (/proc, /sys...), which
 * holds no files (and where `mkdir -p` would loop forever).
 */
export async function prepareStateDir(dir: string): Promise<void> {
  const pseudo = await pseudoFsOf(dir);
  if (pseudo) {
    throw new TmError(ErrorCodes.CONFIG, `node.stateDir ${dir} is on ${pseudo}, a pseudo-filesystem of the kernel that cannot hold the daemon's files; put it on a disk filesystem (e.g. /var/lib/thinmirror)`);
  }
  await fsp.mkdir(dir, { recursive: true, mode: 0o700 }).catch((e: unknown) => {
    throw asTmError(e, ErrorCodes.STATE, `state directory ${dir}`);
  });
}
