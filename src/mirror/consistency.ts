import * as path from 'node:path';
import type { Logger } from 'pino';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { JournaledVolume, listJournals } from '../volume/journal.js';
import { ReflinkBase } from '../volume/reflink-base.js';
import type { Volume } from '../volume/volume.js';
import type { ConsistencyMode, MirrorConfig } from './settings.js';

/** The mode a secondary runs (auto resolved), and why. */
export interface ConsistencyChoice {
  mode: Exclude<ConsistencyMode, 'auto'>;
  /** Why this mode (auto), or null when the config named it. */
  reason: string | null;
  /** Where base images or journals live (null for off). */
  dir: string | null;
}

/** Where a mirror's base images and journals go: `.thinmirror/<name>/` next to a file target, else the mirror's state directory. */
export function consistencyDir(c: MirrorConfig, mirrorStateDir: string, targetIsFile: boolean): string {
  if (c.consistencyDir) return path.join(c.consistencyDir, c.name);
  return targetIsFile ? path.join(path.dirname(c.volume), '.thinmirror', c.name) : path.join(mirrorStateDir, 'journal');
}

/**
 * The secondary's consistency (issue 11 §1): the replica can always be brought
 * back to the image of its last committed generation.
 * - reflink: at BEGIN(N) the target is cloned into a base image of N-1, dropped after COMMIT(N);
 * - journal: the target is wrapped in an undo journal ({@link JournaledVolume});
 * - off: nothing (status says the replica is not consistent while applying).
 * The Receiver knows none of this: the SecondaryRole wraps the target and calls
 * {@link begin} and {@link committed} from its ReplicaRecord.
 */
export class Consistency {
  private constructor(
    readonly choice: ConsistencyChoice,
    private readonly chunkSize: number,
    private readonly base: ReflinkBase | null,
    private readonly log: Logger,
  ) {}

  /** Resolve the config's mode for `target` (which must exist); TM_ERR_CONSISTENCY when `reflink` cannot work. */
  static async pick(c: MirrorConfig, mirrorStateDir: string, target: Volume, log: Logger): Promise<Consistency> {
    const isFile = target.kind === 'file';
    const dir = consistencyDir(c, mirrorStateDir, isFile);
    if (c.consistency === 'off') return new Consistency({ mode: 'off', reason: null, dir: null }, c.chunkSize, null, log);
    if (c.consistency === 'journal') return new Consistency({ mode: 'journal', reason: null, dir }, c.chunkSize, null, log);
    const probe = isFile ? await ReflinkBase.usable(c.volume, dir) : { ok: false as const, reason: `${c.volume} is not a regular file` };
    if (probe.ok) {
      return new Consistency({ mode: 'reflink', reason: c.consistency === 'auto' ? `FICLONE works from ${c.volume} into ${dir}` : null, dir }, c.chunkSize, new ReflinkBase(c.volume, dir), log);
    }
    if (c.consistency === 'reflink') {
      throw new TmError(ErrorCodes.CONSISTENCY, `mirror ${c.name}: consistency: reflink cannot work: ${probe.reason}; put the target on XFS (reflink=1) or btrfs, or use consistency: auto or journal`);
    }
    return new Consistency({ mode: 'journal', reason: `${probe.reason}; using the undo journal`, dir }, c.chunkSize, null, log);
  }

  /** The volume the receiver writes: the journal wrapper in journal mode, else `target` itself. */
  async wrap(target: Volume, committed: number): Promise<Volume> {
    if (this.choice.mode !== 'journal') return target;
    return JournaledVolume.open(target, {
      dir: this.choice.dir!,
      chunkSize: this.chunkSize,
      committed,
      log: this.log,
      // Test-only: the crash test of issue 11 §2 breaks the ordering on purpose to show that it catches it.
      ...(process.env.TM_TEST_UNSAFE_JOURNAL_ORDER === '1' ? { unsafeWriteBeforeJournal: true } : {}),
      ...(process.env.TM_TEST_JOURNAL_GAP_MS ? { testGapMs: Number(process.env.TM_TEST_JOURNAL_GAP_MS) } : {}),
    });
  }

  /** Before the first write of generation `gen` (also when it resumes): the base or the journal is ready. */
  async begin(volume: Volume, gen: number, committed: number): Promise<void> {
    try {
      if (this.base) {
        const b = await this.base.ensure(committed);
        if (b.cloned) this.log.info({ generation: gen, base: b.file }, 'base image of the committed generation cloned');
      } else if (volume instanceof JournaledVolume) {
        await volume.begin(gen);
      }
    } catch (e) {
      throw asTmError(e, ErrorCodes.CONSISTENCY, `preparing generation ${gen}`);
    }
  }

  /** After COMMIT(`gen`) is durable (target flushed, state saved): the base or journal goes. */
  async committed(volume: Volume, gen: number): Promise<void> {
    if (this.base) await this.base.drop();
    else if (volume instanceof JournaledVolume) await volume.commit(gen);
  }

  /** The base image while a generation is applied (reflink), else null. */
  async baseImage(committed: number): Promise<string | null> {
    if (!this.base) return null;
    return (await this.base.list()).find((b) => b.generation === committed)?.file ?? null;
  }
}

/** What is there to restore the committed image from: a base image (reflink), undo journals, or nothing. */
export async function undoLeft(c: MirrorConfig, mirrorStateDir: string, targetIsFile: boolean): Promise<'reflink' | 'journal' | null> {
  const dir = consistencyDir(c, mirrorStateDir, targetIsFile);
  if ((await new ReflinkBase(c.volume, dir).list()).length > 0) return 'reflink';
  if ((await listJournals(dir)).length > 0) return 'journal';
  return null;
}

/**
 * Restore the image of the last committed generation on a stopped target,
 * from whatever the consistency mode left: a base image (reflink) or undo
 * journals. Idempotent. Returns what was undone.
 */
export async function rollbackTarget(
  c: MirrorConfig,
  mirrorStateDir: string,
  target: Volume,
  committed: number,
  log: Logger,
): Promise<{ mode: 'reflink' | 'journal' | null; generation: number | null; bytes: number }> {
  const isFile = target.kind === 'file';
  const dir = consistencyDir(c, mirrorStateDir, isFile);
  switch (await undoLeft(c, mirrorStateDir, isFile)) {
    case 'reflink':
      return { mode: 'reflink', generation: await new ReflinkBase(c.volume, dir).rollback(committed), bytes: 0 };
    case 'journal': {
      const r = await JournaledVolume.rollback(target, dir, { committed, log });
      return { mode: 'journal', generation: r.generation, bytes: r.bytes };
    }
    default:
      return { mode: null, generation: null, bytes: 0 };
  }
}
