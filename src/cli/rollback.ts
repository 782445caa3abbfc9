import { pino } from 'pino';
import { ErrorCodes, TmError } from '../errors.js';
import { loadConfig } from '../daemon/config.js';
import { acquireLock } from '../daemon/lock.js';
import { rollbackStopped, type RollbackReport } from '../mirror/rollback.js';
import { formatBytes } from '../util/units.js';

/**
 * `rollback MIRROR --config FILE`: on a stopped daemon (it takes the state
 * directory's lock, so it refuses while the daemon runs), restore the target
 * of the secondary mirror MIRROR to its last committed generation.
 */
export async function runRollback(configPath: string, name: string, json: boolean): Promise<number> {
  const cfg = await loadConfig(configPath);
  const m = cfg.mirrors.find((x) => x.name === name);
  if (!m) throw new TmError(ErrorCodes.USAGE, `rollback: ${configPath} has no mirror named "${name}" (it has ${cfg.mirrors.map((x) => x.name).join(', ') || 'none'})`);
  const release = await acquireLock(cfg.node.stateDir).catch((e: unknown) => {
    if (e instanceof TmError && e.code === ErrorCodes.LOCKED) throw new TmError(ErrorCodes.LOCKED, `rollback needs the mirror stopped: ${e.message}; stop the daemon first (systemctl stop thinmirror)`);
    throw e;
  });
  let r: RollbackReport;
  try {
    r = await rollbackStopped(m, cfg.node.stateDir, pino({ level: 'warn' }, pino.destination(2)));
  } finally {
    await release();
  }
  if (json) console.log(JSON.stringify(r, null, 2));
  else if (r.undone === null) console.log(`${r.mirror}: nothing to roll back; the target holds generation ${r.committedGeneration}`);
  else console.log(`${r.mirror}: generation ${r.undone} undone (${r.mode === 'reflink' ? 'base image cloned back' : `journal replayed, ${formatBytes(r.bytes)} written back`}); the target holds generation ${r.committedGeneration}`);
  return 0;
}
