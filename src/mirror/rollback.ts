import * as path from 'node:path';
import type { Logger } from 'pino';
import { ErrorCodes, TmError } from '../errors.js';
import { openVolume } from '../volume/factory.js';
import { rollbackTarget, undoLeft } from './consistency.js';
import type { MirrorConfig } from './settings.js';
import { StateFile } from './state.js';

/** What {@link rollbackStopped} did. */
export interface RollbackReport {
  mirror: string;
  /** The generation the target holds now. */
  committedGeneration: number;
  /** The generation that was partly applied and is undone, or null when none was. */
  undone: number | null;
  /** How: the base image, the undo journal, or nothing to undo. */
  mode: 'reflink' | 'journal' | null;
  /** Data bytes written back from the journal (0 for a base image: it is cloned). */
  bytes: number;
}

/**
 * `thinmirror rollback MIRROR`: bring a stopped secondary's target back to
 * the image of its last committed generation (issue 11 §1). The caller holds
 * the state directory's lock (no daemon runs the mirror).
 *
 * Order, so that a kill at any point and a second run give the same image:
 * 1. state.json records that nothing is being applied (`applying: null`):
 *    from here no session can resume the torn generation over a restored
 *    target; a daemon that starts finishes the restore itself;
 * 2. the base image is cloned back, or the journal replayed in reverse, and
 *    the target flushed (both idempotent);
 * 3. the base or journal is deleted.
 */
export async function rollbackStopped(c: MirrorConfig, stateDir: string, log: Logger): Promise<RollbackReport> {
  const file = new StateFile(path.join(stateDir, c.name));
  const loaded = await file.load();
  if (!loaded) throw new TmError(ErrorCodes.STATE, `mirror ${c.name}: no state in ${file.file}: nothing was ever applied, there is nothing to roll back`);
  const s = loaded.state;
  if (s.role !== 'secondary') throw new TmError(ErrorCodes.STATE, `mirror ${c.name} is ${s.role} (${file.file}): only a secondary's replica is rolled back`);
  const undoing = s.applying?.generation ?? null;
  const target = await openVolume(c.volume, {});
  try {
    if (s.applying !== null) {
      if ((await undoLeft(c, path.join(stateDir, c.name), target.kind === 'file')) === null) {
        throw new TmError(
          ErrorCodes.CONSISTENCY,
          `mirror ${c.name}: generation ${s.applying.generation} is partly applied and there is no base image or undo journal to restore generation ${s.committedGeneration} from (consistency: ${c.consistency}); the replica stays as it is until the primary sends generation ${s.applying.generation} again`,
        );
      }
      s.applying = null;
      s.applyingViewAt = null;
      s.generation = s.committedGeneration;
      await file.save(s);
    }
    const r = await rollbackTarget(c, path.join(stateDir, c.name), target, s.committedGeneration, log);
    await target.flush();
    return { mirror: c.name, committedGeneration: s.committedGeneration, undone: undoing ?? r.generation, mode: r.mode, bytes: r.bytes };
  } finally {
    await target.close();
  }
}
