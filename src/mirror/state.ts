import * as path from 'node:path';
import { promises as fsp } from 'node:fs';
import { ErrorCodes, TmError } from '../errors.js';
import { readJsonFile, removeStaleTemps, writeFileAtomic } from '../util/atomic.js';

/** Bumped when the layout of state.json changes incompatibly. */
export const STATE_FORMAT = 1;

export interface PrimaryState {
  format: number;
  role: 'primary';
  /** Random id of the source volume, fixed for the mirror's life (hex). */
  volumeId: string;
  volumeSize: number;
  chunkSize: number;
  /** Last generation created (its bitmap exists until committed). */
  generation: number;
  /** Last generation the secondary acknowledged. */
  committedGeneration: number;
  /** Generation whose bitmap is on disk and not yet acknowledged, or null. */
  pending: number | null;
  /** For `pending`: bytes below which the secondary reported it durable. */
  cursor: number;
  /**
   * Why the next generation must come from comparing digests with the
   * secondary (tracking state lost), or null/absent.
   */
  reconcile?: string | null;
  /** Unix ms of the oldest change not yet committed on the secondary (lag), or null. */
  oldestUncommittedAt: number | null;
}

export interface SecondaryState {
  format: number;
  role: 'secondary';
  volumeId: string;
  volumeSize: number;
  chunkSize: number;
  primaryNode: string;
  committedGeneration: number;
  /** A generation partly applied: chunks of it below `cursor` (bytes) are durable. */
  applying: { generation: number; cursor: number } | null;
  /** Unix ms when the last generation was committed. */
  committedAt: number | null;
}

export type MirrorState = PrimaryState | SecondaryState;

/**
 * The mirror's `state.json` under `stateDir/<mirror>/`, always replaced
 * atomically, so a crash leaves the old or the new version and never a torn one.
 */
export class StateFile<T extends MirrorState> {
  readonly file: string;
  constructor(readonly dir: string) {
    this.file = path.join(dir, 'state.json');
  }

  async init(): Promise<void> {
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
    await removeStaleTemps(this.dir);
  }

  async load(role: T['role']): Promise<T | undefined> {
    const s = await readJsonFile<T>(this.file);
    if (s === undefined) return undefined;
    if (typeof s !== 'object' || s === null || s.format !== STATE_FORMAT) {
      throw new TmError(ErrorCodes.STATE, `${this.file}: unknown state format ${JSON.stringify((s as { format?: unknown })?.format)}`);
    }
    if (s.role !== role) {
      throw new TmError(ErrorCodes.STATE, `${this.file} belongs to a ${s.role} mirror, but the config says ${role}; promote/demote are not available yet`);
    }
    return s;
  }

  async save(state: T): Promise<void> {
    await writeFileAtomic(this.file, JSON.stringify(state, null, 2) + '\n');
  }
}
