import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { asTmError, ErrorCodes, TmError } from '../errors.js';

/**
 * Write a file so that it is never seen half-written: write a temp file in the
 * same directory, fsync it, rename it over the target, fsync the directory.
 * A crash leaves either the old or the new content (and maybe a `.tmp-` file,
 * which readers ignore and {@link removeStaleTemps} deletes).
 */
export async function writeFileAtomic(file: string, data: Buffer | string): Promise<void> {
  const dir = path.dirname(file);
  const tmp = path.join(dir, `.${path.basename(file)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  let fh: fsp.FileHandle | undefined;
  try {
    fh = await fsp.open(tmp, 'w', 0o600);
    await fh.writeFile(data);
    await fh.sync();
    await fh.close();
    fh = undefined;
    await fsp.rename(tmp, file);
    await fsyncDir(dir);
  } catch (e) {
    if (fh) await fh.close().catch(() => {});
    await fsp.rm(tmp, { force: true }).catch(() => {});
    throw asTmError(e, ErrorCodes.STATE, `writing ${file}`);
  }
}

/** fsync a directory so that a rename or unlink in it is durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const dh = await fsp.open(dir, 'r');
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}

/** Remove an entry and make the removal durable. Missing is fine. */
export async function removeDurably(file: string): Promise<void> {
  await fsp.rm(file, { force: true });
  await fsyncDir(path.dirname(file));
}

/** Read and parse a JSON state file; undefined when it does not exist. */
export async function readJsonFile<T>(file: string): Promise<T | undefined> {
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw asTmError(e, ErrorCodes.STATE, `reading ${file}`);
  }
  try {
    return JSON.parse(text) as T;
  } catch (e) {
    throw new TmError(ErrorCodes.STATE, `${file}: not valid JSON (${(e as Error).message})`, { cause: e });
  }
}

/** Delete temp files left by an interrupted {@link writeFileAtomic} in `dir`. */
export async function removeStaleTemps(dir: string): Promise<void> {
  let names: string[];
  try {
    names = await fsp.readdir(dir);
  } catch {
    return;
  }
  await Promise.all(names.filter((n) => /^\..+\.tmp-\d+-[0-9a-f]+$/.test(n)).map((n) => fsp.rm(path.join(dir, n), { force: true })));
}
