import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { z } from 'zod';
import { ErrorCodes, TmError } from '../errors.js';
import { readJsonFile, removeStaleTemps, writeFileAtomic } from '../util/atomic.js';
import { GEN_ID_RE, MAX_HISTORY, type GenId, type SplitBrain } from './history.js';

/**
 * Layout of state.json. Format 1 (releases up to 0.1.0) had one shape per
 * role and refused a role change; format 2 holds both roles' fields in one
 * shape, so that a role change is a field change. A format-1 file is migrated
 * when it is loaded (and written back in format 2).
 */
export const STATE_FORMAT = 2;

export type Role = 'primary' | 'secondary';

export type { Applying } from './receiver.js';
import type { Applying } from './receiver.js';

/**
 * One mirror's durable state (format 2). Every field exists whatever the
 * role: the sending fields (generation, pending, cursor, reconcile,
 * oldestUncommittedAt) are what a primary drives; the receiving fields
 * (applying, committedAt) what a secondary drives; committedGeneration and the
 * volume identity are shared.
 */
export interface MirrorState {
  format: typeof STATE_FORMAT;
  role: Role;
  /** Random id of the source volume, fixed for the mirror's life (hex). */
  volumeId: string;
  volumeSize: number;
  chunkSize: number;
  /** Node name of the peer of the last session (a secondary: the primary that sent), or null. */
  peerNode: string | null;
  /** Last generation created (sending) or begun (receiving). */
  generation: number;
  /** Last generation committed on the secondary (acknowledged to the primary). */
  committedGeneration: number;
  /** Sending: generation whose bitmap is on disk and not yet acknowledged, or null. */
  pending: number | null;
  /** Sending, for `pending`: bytes below which the secondary reported it durable. */
  cursor: number;
  /** Sending: why the next generation must come from comparing digests with the secondary (tracking state lost), or null. */
  reconcile: string | null;
  /** Sending: Unix ms of the oldest change not yet committed on the secondary (lag), or null. */
  oldestUncommittedAt: number | null;
  /** Receiving: a generation partly applied, or null (the target holds `committedGeneration`). */
  applying: Applying | null;
  /** Receiving: Unix ms when the last generation was committed, or null. */
  committedAt: number | null;
  /** Receiving: the drills (writable clones of the replica) this mirror keeps; absent in files written before drills. */
  drills?: DrillRecord[];
  /** The identities of the committed generations since the last full sync, oldest first (history.ts); absent in older files. */
  history?: GenId[];
  /** Sending: the identity of the pending generation. */
  pendingGid?: GenId | null;
  /** Receiving: the identity of the generation being applied (from its begin). */
  applyingGid?: GenId | null;
  /** Chunks this side changed that the peer never committed (a demoted primary's, kept for the reverse resync), or null. */
  divergence?: Divergence | null;
  /** A split brain found on the last meeting with the peer (issue 12 §5), until it is resolved. */
  splitBrain?: SplitBrain | null;
  /**
   * Unix ms when the view behind `committedGeneration` was taken on the
   * primary (snapshot time for reflink and lvm-thin, start of the pass for
   * scan): the replica's image is the source as it was then (issue 15). Null
   * or absent when not known (no commit yet, or a file written before).
   * Detection passes that find nothing changed move it on in memory only
   * (the roles' `viewAt`); after a restart the lag counts from this, older, moment.
   */
  committedViewAt?: number | null;
  /** Sending: when the view of `pending` was taken (becomes `committedViewAt` at its commit). */
  pendingViewAt?: number | null;
  /** Receiving: when the view of `applying` was taken on the primary (its begin's `viewAt`). */
  applyingViewAt?: number | null;
}

/**
 * The chunks this side changed since `since` (its last committed generation)
 * that the other side never committed: the bitmap is `divergent.roaring` in
 * the mirror's directory (divergence.ts). `unknown`: which chunks is not known
 * (committed generations whose bitmaps are gone): the next resync compares digests.
 */
export interface Divergence {
  since: GenId | null;
  bytes: number;
  unknown: boolean;
  /** Why: demoted, split brain resolved, ... (shown in status). */
  reason: string;
  /** Secondary: the generation the primary said covers these chunks; committing it clears the divergence. */
  coveredBy: number | null;
}

export type { SplitBrain } from './history.js';

/** A drill (issue 11 §3): a writable clone of the replica's consistent image, a regular file next to the target. */
export interface DrillRecord {
  /** Its name: letters, digits, `.`, `_`, `-`, at most 64, starting with a letter or a digit. */
  name: string;
  /** The clone (absolute path). */
  path: string;
  /** The committed generation whose image was cloned. */
  generation: number;
  /** Unix ms when it was taken. */
  createdAt: number;
}

const count = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
const applying = z.strictObject({ generation: count, cursor: count }).nullable();
/** A drill's name: letters, digits, `.`, `_`, `-`; at most 64; the first a letter or a digit (never `.`/`..`, never an option). */
export const DRILL_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const drill = z.strictObject({ name: z.string().regex(DRILL_NAME, 'expected a drill name'), path: z.string().min(1), generation: count, createdAt: count });
const genId = z.strictObject({ node: z.string().min(1).max(128), generation: count, id: z.string().regex(GEN_ID_RE, 'expected 16 hex digits') });
const divergence = z
  .strictObject({ since: genId.nullable(), bytes: count, unknown: z.boolean(), reason: z.string(), coveredBy: count.nullable() })
  .nullable();
const splitBrain = z
  .strictObject({ detectedAt: count, peerNode: z.string(), common: genId.nullable(), localBytes: count.nullable(), peerBytes: count.nullable(), why: z.string() })
  .nullable();
const identity = {
  volumeId: z.string().regex(/^[0-9a-f]{1,64}$/, 'expected a hex volume id'),
  volumeSize: count,
  chunkSize: count.refine((n) => n > 0 && (n & (n - 1)) === 0, 'expected a power of two'),
};

const format2 = z.strictObject({
  format: z.literal(2),
  role: z.enum(['primary', 'secondary']),
  ...identity,
  peerNode: z.string().nullable(),
  generation: count,
  committedGeneration: count,
  pending: count.nullable(),
  cursor: count,
  reconcile: z.string().nullable(),
  oldestUncommittedAt: count.nullable(),
  applying,
  committedAt: count.nullable(),
  drills: z.array(drill).optional(),
  history: z.array(genId).max(MAX_HISTORY).optional(),
  pendingGid: genId.nullable().optional(),
  applyingGid: genId.nullable().optional(),
  divergence: divergence.optional(),
  splitBrain: splitBrain.optional(),
  committedViewAt: count.nullable().optional(),
  pendingViewAt: count.nullable().optional(),
  applyingViewAt: count.nullable().optional(),
});

/** Format 1 as the 0.1.0 release wrote it, one shape per role. */
const format1Primary = z.strictObject({
  format: z.literal(1),
  role: z.literal('primary'),
  ...identity,
  generation: count,
  committedGeneration: count,
  pending: count.nullable(),
  cursor: count,
  reconcile: z.string().nullable().optional(),
  oldestUncommittedAt: count.nullable(),
});
const format1Secondary = z.strictObject({
  format: z.literal(1),
  role: z.literal('secondary'),
  ...identity,
  primaryNode: z.string(),
  committedGeneration: count,
  applying,
  committedAt: count.nullable(),
});

/**
 * `s` frozen, with its nested objects: the state a Mirror holds is replaced
 * whole after each save, never changed in place (see StateStore.update), and
 * a change in place anywhere would throw here instead of putting the memory
 * ahead of the file. Returns `s`.
 */
export function freezeState(s: MirrorState): Readonly<MirrorState> {
  if (s.applying) Object.freeze(s.applying);
  if (s.drills) {
    for (const d of s.drills) Object.freeze(d);
    Object.freeze(s.drills);
  }
  if (s.history) {
    for (const g of s.history) Object.freeze(g);
    Object.freeze(s.history);
  }
  for (const o of [s.pendingGid, s.applyingGid, s.divergence, s.divergence?.since, s.splitBrain, s.splitBrain?.common]) if (o) Object.freeze(o);
  return Object.freeze(s);
}

/** A fresh state of `role` for a volume (nothing sent or applied yet). */
export function newState(role: Role, id: { volumeId: string; volumeSize: number; chunkSize: number; peerNode?: string | null }): MirrorState {
  return {
    format: STATE_FORMAT,
    role,
    volumeId: id.volumeId,
    volumeSize: id.volumeSize,
    chunkSize: id.chunkSize,
    peerNode: id.peerNode ?? null,
    generation: 0,
    committedGeneration: 0,
    pending: null,
    cursor: 0,
    reconcile: null,
    oldestUncommittedAt: null,
    applying: null,
    committedAt: null,
  };
}

/**
 * Parse the contents of a state file of format 1 or 2 into format 2.
 * `migrated` says the input was format 1. Throws TM_ERR_STATE naming `file`
 * and the field at fault.
 */
export function parseState(value: unknown, file: string): { state: MirrorState; migrated: boolean } {
  const fmt = typeof value === 'object' && value !== null ? (value as { format?: unknown }).format : undefined;
  const schema = fmt === 2 ? format2 : fmt === 1 ? z.discriminatedUnion('role', [format1Primary, format1Secondary]) : null;
  if (!schema) throw new TmError(ErrorCodes.STATE, `${file}: unknown state format ${JSON.stringify(fmt)} (this release reads formats 1 and 2)`);
  const r = schema.safeParse(value);
  if (!r.success) {
    const i = r.error.issues[0]!;
    throw new TmError(ErrorCodes.STATE, `${file}: ${i.path.length ? i.path.join('.') : 'state'}: ${i.message}`);
  }
  const v = r.data;
  if (v.format === 2) return { state: v, migrated: false };
  const base = newState(v.role, v);
  if (v.role === 'primary') {
    return {
      state: { ...base, generation: v.generation, committedGeneration: v.committedGeneration, pending: v.pending, cursor: v.cursor, reconcile: v.reconcile ?? null, oldestUncommittedAt: v.oldestUncommittedAt },
      migrated: true,
    };
  }
  return {
    state: {
      ...base,
      peerNode: v.primaryNode,
      generation: Math.max(v.committedGeneration, v.applying?.generation ?? 0),
      committedGeneration: v.committedGeneration,
      applying: v.applying,
      committedAt: v.committedAt,
    },
    migrated: true,
  };
}

/**
 * The mirror's `state.json` under `stateDir/<mirror>/`, always replaced
 * atomically, so a crash leaves the old or the new version and never a torn one.
 */
export class StateFile {
  readonly file: string;
  /** The last save asked (see {@link save}). */
  private saving: Promise<unknown> = Promise.resolve();
  /** `write` replaces the file's content (default: atomically, fsynced); tests inject failures through it. */
  constructor(
    readonly dir: string,
    private readonly write: (file: string, data: string) => Promise<void> = writeFileAtomic,
  ) {
    this.file = path.join(dir, 'state.json');
  }

  async init(): Promise<void> {
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
    await removeStaleTemps(this.dir);
  }

  /** The state on disk (format 1 is migrated and written back as format 2), or undefined when there is none. */
  async load(): Promise<{ state: MirrorState; migrated: boolean } | undefined> {
    const raw = await readJsonFile<unknown>(this.file);
    if (raw === undefined) return undefined;
    const r = parseState(raw, this.file);
    if (r.migrated) await this.save(r.state);
    return r;
  }

  /**
   * Saves run one at a time, each writing `state` as it is when its turn
   * comes: two saves asked at once (a receiver's checkpoint and a drill's
   * record) can never leave the older snapshot on disk.
   */
  save(state: MirrorState): Promise<void> {
    const run = this.saving.then(() => this.write(this.file, JSON.stringify(state, null, 2) + '\n'));
    this.saving = run.catch(() => {});
    return run;
  }
}
