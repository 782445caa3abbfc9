/**
 * One error base class for thinmirror. Every failure carries a stable `code`
 * (`TM_ERR_...`); callers match on `code`, never on message text. Every code is
 * listed in docs/errors.md.
 */

export const ErrorCodes = {
  /** Configuration file missing, unreadable, not YAML, or failing validation. */
  CONFIG: 'TM_ERR_CONFIG',
  /** A config reload (SIGHUP) changes a key that only a restart can change (node.name, node.stateDir, listen, metrics, tls). */
  RELOAD: 'TM_ERR_RELOAD',
  /** A command-line argument is missing, unknown or malformed. */
  USAGE: 'TM_ERR_USAGE',
  /** A size or duration string cannot be parsed ("64KiB", "30s"). */
  PARSE: 'TM_ERR_PARSE',
  /** The native addon could not be loaded or a system call failed. */
  NATIVE: 'TM_ERR_NATIVE',
  /** A volume cannot be opened, read or written. */
  VOLUME_IO: 'TM_ERR_VOLUME_IO',
  /** A volume operation received arguments outside the volume. */
  VOLUME_RANGE: 'TM_ERR_VOLUME_RANGE',
  /** The target filesystem or device is full. */
  NO_SPACE: 'TM_ERR_NO_SPACE',
  /** A wire frame could not be decoded or failed validation. */
  PROTOCOL: 'TM_ERR_PROTOCOL',
  /** The peer speaks another protocol version. */
  VERSION_MISMATCH: 'TM_ERR_VERSION_MISMATCH',
  /** Mutual HMAC authentication failed (wrong pre-shared key). */
  AUTH_FAILED: 'TM_ERR_AUTH_FAILED',
  /** The secondary does not hold a mirror of that name (or holds it as primary). */
  UNKNOWN_MIRROR: 'TM_ERR_UNKNOWN_MIRROR',
  /** Source and target volume sizes differ. */
  SIZE_MISMATCH: 'TM_ERR_SIZE_MISMATCH',
  /** Primary and secondary disagree on the chunk size. */
  CHUNK_SIZE_MISMATCH: 'TM_ERR_CHUNK_SIZE_MISMATCH',
  /** The target belongs to another source volume (volume id differs). */
  IDENTITY_MISMATCH: 'TM_ERR_IDENTITY_MISMATCH',
  /** A data payload did not match its checksum. */
  CHECKSUM: 'TM_ERR_CHECKSUM',
  /** The peer did not answer in time. */
  TIMEOUT: 'TM_ERR_TIMEOUT',
  /** The connection to the peer closed or could not be opened. */
  CONNECTION: 'TM_ERR_CONNECTION',
  /** TLS refused a session: a certificate unknown to the CA, expired, for another host, or no certificate. */
  TLS: 'TM_ERR_TLS',
  /** The peer reported an error and closed the session. */
  PEER: 'TM_ERR_PEER',
  /** A state file is unreadable or inconsistent. */
  STATE: 'TM_ERR_STATE',
  /** Another daemon holds the lock on this state directory. */
  LOCKED: 'TM_ERR_LOCKED',
  /** The daemon's control socket is not reachable. */
  CONTROL: 'TM_ERR_CONTROL',
  /** An LVM, device-mapper or thin-provisioning-tools command failed (the command, its exit status and stderr are named). */
  LVM: 'TM_ERR_LVM',
  /** An external program thinmirror runs is not installed (the message names the package). */
  TOOL_MISSING: 'TM_ERR_TOOL_MISSING',
  /** The operation was aborted (shutdown). */
  ABORTED: 'TM_ERR_ABORTED',
  /** A change source cannot work here (no reflink, snapshot missing, FIEMAP failed). */
  TRACKING: 'TM_ERR_TRACKING',
  /** The two images differ (demo / verify). */
  VERIFY: 'TM_ERR_VERIFY',
  /** consistency: reflink where the target's filesystem has no reflink, or a base/journal that cannot be made. */
  CONSISTENCY: 'TM_ERR_CONSISTENCY',
  /** `drill start` where the target's filesystem has no reflink (FICLONE) or the consistency mode keeps no clonable image. */
  DRILL_UNSUPPORTED: 'TM_ERR_DRILL_UNSUPPORTED',
  /** `drill stop` while the clone is held open by a process or backs a loop device (without --force). */
  DRILL_BUSY: 'TM_ERR_DRILL_BUSY',
  /** `drill start` with the name of a drill (or a file) that already exists. */
  DRILL_EXISTS: 'TM_ERR_DRILL_EXISTS',
  /** `drill stop` of a drill the mirror does not record. */
  DRILL_UNKNOWN: 'TM_ERR_DRILL_UNKNOWN',
  /** Both sides wrote after they diverged (two primaries, or a secondary holding generations the primary never made): nothing is written until `resolve`. */
  SPLIT_BRAIN: 'TM_ERR_SPLIT_BRAIN',
  /** `promote` while a primary is connected and replicating to this side (without --force). */
  PEER_CONNECTED: 'TM_ERR_PEER_CONNECTED',
  /** A role command that does not apply to the mirror's role now (promote a primary, demote a secondary, resolve without a split brain). */
  ROLE: 'TM_ERR_ROLE',
  /** A frame after the handshake failed its MAC: modified, replayed, reordered, dropped or injected on the way. */
  FRAME_AUTH: 'TM_ERR_FRAME_AUTH',
  /** An unauthenticated peer went over a limit: a frame larger than the handshake needs, or too many unauthenticated connections. */
  PREAUTH_LIMIT: 'TM_ERR_PREAUTH_LIMIT',
  /** An invariant was violated: a bug. */
  INTERNAL: 'TM_ERR_INTERNAL',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

/**
 * Marks a TmError whichever copy of this module made it: the daemon runs from
 * a bundle (scripts/bundle-run.mjs) with a copy of its own, while the CLI that
 * imports it, and reports what it throws, has tsc's.
 */
const BRAND = Symbol.for('thinmirror.TmError');

/** Base class of every error thinmirror raises on purpose. */
export class TmError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'TmError';
    this.code = code;
    Object.defineProperty(this, BRAND, { value: true });
  }
  /** `instanceof TmError` holds for a TmError of any copy of this module (see BRAND). */
  static override [Symbol.hasInstance](x: unknown): x is TmError {
    return typeof x === 'object' && x !== null && (x as Record<symbol, unknown>)[BRAND] === true;
  }
  /** The form used in status JSON and on the wire. */
  toJSON(): { code: ErrorCode; message: string } {
    return { code: this.code, message: this.message };
  }
}

export function isTmError(e: unknown): e is TmError {
  return e instanceof TmError;
}

/**
 * Wrap any thrown value as a TmError. Node system errors become VOLUME_IO, or
 * NO_SPACE for ENOSPC/EDQUOT, with `what` (file, peer) named in the message.
 */
export function asTmError(e: unknown, fallback: ErrorCode = ErrorCodes.INTERNAL, what?: string): TmError {
  if (e instanceof TmError) return e;
  const err = e as NodeJS.ErrnoException;
  const prefix = what ? `${what}: ` : '';
  if (err && (err.code === 'ENOSPC' || err.code === 'EDQUOT')) {
    return new TmError(ErrorCodes.NO_SPACE, `${prefix}no space left (${err.code})`, { cause: e });
  }
  const msg = err && typeof err.message === 'string' ? err.message : String(e);
  return new TmError(fallback, prefix + msg, { cause: e });
}
