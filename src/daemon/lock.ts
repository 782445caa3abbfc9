import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { LOCK_FILE } from './state-dir.js';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * A pid lock file in the state directory, so that two daemons never drive the
 * same mirrors. A lock left by a dead process is taken over.
 */
export async function acquireLock(stateDir: string): Promise<() => Promise<void>> {
  const file = path.join(stateDir, LOCK_FILE);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fh = await fsp.open(file, 'wx', 0o600);
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      let released = false;
      return async () => {
        if (released) return;
        released = true;
        await fsp.rm(file, { force: true });
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw asTmError(e, ErrorCodes.STATE, `creating ${file}`);
      const pid = Number((await fsp.readFile(file, 'utf8').catch(() => '')).trim());
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && alive(pid)) {
        throw new TmError(ErrorCodes.LOCKED, `state directory ${stateDir} is in use by another thinmirror daemon (pid ${pid}, ${file})`);
      }
      await fsp.rm(file, { force: true });
    }
  }
  throw new TmError(ErrorCodes.LOCKED, `could not take the lock ${file}`);
}
