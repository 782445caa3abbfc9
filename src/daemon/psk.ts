import { randomBytes } from 'node:crypto';
import { constants as fsc, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { ErrorCodes, TmError } from '../errors.js';

/**
 * The pre-shared key file (`auth.pskFile`), docs/config.md "The key file".
 *
 * Format: the key in base64 (RFC 4648, standard alphabet `A-Z a-z 0-9 + /`,
 * `=` padding optional); whitespace anywhere (the trailing newline, the line
 * breaks `base64` puts every 76 characters) is ignored. The key is the
 * decoded bytes, at least {@link MIN_KEY_BYTES} of them: the handshake's HMAC
 * is computed with them, and an outsider who gets one HMAC can guess a weak
 * key offline. The file must not be accessible by group or others (as ssh
 * refuses such a private key). `thinmirror keygen FILE` writes such a file.
 */

/** Fewest key bytes (after base64 decoding) a key file may hold. */
export const MIN_KEY_BYTES = 32;
/** Key bytes `keygen` writes. */
export const KEYGEN_BYTES = 32;
/** Largest key file read (bytes): a key is 44 characters; a bigger file is something else. */
const MAX_FILE_BYTES = 4096;

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

function modeOf(mode: number): string {
  return (mode & 0o7777).toString(8).padStart(4, '0');
}

/**
 * Decode the text of a key file: whitespace dropped, strict base64 (a
 * character outside the alphabet, misplaced padding or a length that cannot be
 * base64 is refused rather than skipped, as Buffer.from would). Returns null
 * when the text is not base64.
 */
export function decodeKeyText(text: string): Buffer | null {
  const t = text.replace(/\s+/g, '');
  if (t.length === 0 || !BASE64.test(t)) return null;
  const bare = t.replace(/=+$/, '');
  // 4n+1 characters cannot come from any byte string; padding, if any, must complete the last group.
  if (bare.length % 4 === 1 || (t.length !== bare.length && t.length % 4 !== 0)) return null;
  const key = Buffer.from(bare, 'base64');
  // Non-zero bits past the last byte (e.g. "AB" instead of "AA"): not what an encoder writes.
  if (key.toString('base64').replace(/=+$/, '') !== bare) return null;
  return key;
}

/**
 * Read the pre-shared key: TM_ERR_CONFIG naming the file when it is missing,
 * not a regular file, accessible by group or others (with the chmod to run),
 * not base64, or shorter than {@link MIN_KEY_BYTES} decoded bytes.
 */
export async function readPsk(file: string): Promise<Buffer> {
  const what = `pre-shared key file ${file} (auth.pskFile)`;
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(file, fsc.O_RDONLY | fsc.O_NONBLOCK);
  } catch (e) {
    throw new TmError(ErrorCodes.CONFIG, `cannot read the ${what}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
  }
  let buf: Buffer;
  try {
    // The checks look at the file that is read (fstat of the open file), not at whatever the path names a moment later.
    const st = await fh.stat();
    if (!st.isFile()) throw new TmError(ErrorCodes.CONFIG, `the ${what} is not a regular file`);
    if ((st.mode & 0o077) !== 0) {
      throw new TmError(
        ErrorCodes.CONFIG,
        `the ${what} is accessible by group or others (mode ${modeOf(st.mode)}): anyone who reads it can join the mirror; run: chmod 600 ${file}`,
      );
    }
    if (st.size > MAX_FILE_BYTES) throw new TmError(ErrorCodes.CONFIG, `the ${what} has ${st.size} bytes; a key file holds a base64 key of a few dozen characters (thinmirror keygen ${file})`);
    buf = await fh.readFile();
  } finally {
    await fh.close();
  }
  const key = decodeKeyText(buf.toString('latin1'));
  if (key === null) {
    throw new TmError(ErrorCodes.CONFIG, `the ${what} does not hold a base64 key; make one with: thinmirror keygen --force ${file} (then copy it to the other host)`);
  }
  if (key.length < MIN_KEY_BYTES) {
    throw new TmError(
      ErrorCodes.CONFIG,
      `the ${what} holds a key of ${key.length} bytes (after base64 decoding); expected at least ${MIN_KEY_BYTES}; make one with: thinmirror keygen --force ${file} (then copy it to the other host)`,
    );
  }
  return key;
}

/** The text of a new key file: {@link KEYGEN_BYTES} random bytes in base64 and a newline. */
export function newKeyText(): string {
  return `${randomBytes(KEYGEN_BYTES).toString('base64')}\n`;
}

/**
 * Write a new key file (`thinmirror keygen`): {@link newKeyText}, mode 0600,
 * never seen half-written (a temp file in the same directory, fsynced, then
 * linked, or renamed with `force`, to `file`). Without `force` an existing
 * `file` is refused (TM_ERR_CONFIG): it may be the key the other host holds.
 */
export async function writeKeyFile(file: string, o: { force?: boolean } = {}): Promise<void> {
  const dir = path.dirname(path.resolve(file));
  const tmp = path.join(dir, `.${path.basename(file)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  const fail = (e: unknown, doing: string) =>
    new TmError(ErrorCodes.CONFIG, `cannot write the key file ${file}: ${doing}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
  let fh: fsp.FileHandle | undefined;
  try {
    try {
      fh = await fsp.open(tmp, 'wx', 0o600);
      // The umask only takes bits away; say 0600 exactly whatever it is.
      await fh.chmod(0o600);
      await fh.writeFile(newKeyText());
      await fh.sync();
      await fh.close();
      fh = undefined;
    } catch (e) {
      throw fail(e, `creating ${tmp}`);
    }
    if (o.force) {
      await fsp.rename(tmp, file).catch((e: unknown) => {
        throw fail(e, 'renaming the new key into place');
      });
    } else {
      // link() fails with EEXIST when `file` exists: no window in which an existing key could be replaced.
      await fsp.link(tmp, file).catch((e: unknown) => {
        if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
          throw new TmError(ErrorCodes.CONFIG, `the key file ${file} exists; keygen does not replace a key (the other host may hold it): use --force to replace it`);
        }
        throw fail(e, 'linking the new key into place');
      });
    }
    const dh = await fsp.open(dir, 'r');
    await dh.sync().finally(() => dh.close());
  } finally {
    if (fh) await fh.close().catch(() => {});
    await fsp.rm(tmp, { force: true }).catch(() => {});
  }
}
