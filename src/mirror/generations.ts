import type { RoaringBitmap32 } from '../track/bitmap-store.js';
import type { Applying, MirrorState } from './state.js';

/**
 * Generation bookkeeping of the sending side, as small functions over the
 * state (no I/O: the caller saves the state, and writes or removes bitmaps,
 * in the order the comments give). The life of generation N:
 *
 *   created (bitmap N on disk, `pending` = N, cursor 0)
 *   -> cursor advanced by the secondary's checkpoints while N is sent
 *   -> committed (`committedGeneration` = N, `pending` null), then bitmap N removed.
 */

/** What the sending side does next. */
export type NextStep =
  | { kind: 'send'; generation: number }
  | { kind: 'reconcile'; reason: string }
  | { kind: 'initial-sync' }
  | { kind: 'wait' };

export function nextStep(s: MirrorState): NextStep {
  if (s.pending !== null) return { kind: 'send', generation: s.pending };
  if (s.reconcile) return { kind: 'reconcile', reason: s.reconcile };
  if (s.generation === 0) return { kind: 'initial-sync' };
  return { kind: 'wait' };
}

/** The primary has no tracking state for this mirror yet (AuthMsg.fresh). */
export function isFresh(s: MirrorState): boolean {
  return s.generation === 0 && s.committedGeneration === 0;
}

/**
 * Make the next generation pending (its bitmap must already be on disk).
 * `detectedAt`: Unix ms of the start of the detection pass that found its
 * changes; `viewAt`: when the view it is read from was taken (at or after
 * `detectedAt`), the moment the replica's image will be of once it is
 * committed. Returns its number.
 */
export function createGeneration(s: MirrorState, detectedAt: number, viewAt: number = detectedAt): number {
  const gen = s.generation + 1;
  s.generation = gen;
  s.pending = gen;
  s.cursor = 0;
  s.oldestUncommittedAt ??= detectedAt;
  s.pendingViewAt = viewAt;
  s.reconcile = null;
  return gen;
}

/**
 * The secondary reported `durable` bytes of the pending generation as
 * durable. Returns true when that moves the cursor (then a checkpoint is due).
 */
export function advanceCursor(s: MirrorState, durable: number): boolean {
  if (durable <= s.cursor) return false;
  s.cursor = durable;
  return true;
}

/** The secondary committed `gen`: nothing is pending any more (remove bitmap `gen` after saving). */
export function commitGeneration(s: MirrorState, gen: number): void {
  // The replica is now the view of `gen` (unknown when its state predates view times).
  s.committedViewAt = s.pending === gen ? (s.pendingViewAt ?? null) : null;
  s.committedGeneration = gen;
  s.pending = null;
  s.pendingViewAt = null;
  s.cursor = 0;
  s.oldestUncommittedAt = null;
}

/** Tracking state was lost: the next generation comes from comparing digests (`why` is shown in status). */
export function requireReconcile(s: MirrorState, why: string): void {
  s.reconcile = why;
}

/**
 * The pending generation the secondary has committed already (the
 * acknowledgement was lost with the last session), or null.
 */
export function committedMeanwhile(s: MirrorState, peerCommitted: number): number | null {
  return s.pending !== null && peerCommitted >= s.pending ? s.pending : null;
}

/**
 * After the handshake (and after {@link committedMeanwhile} was applied):
 * compare what the secondary reports with what this side knows, and ask for a
 * reconciliation by digests when either side lost its state. Returns true
 * when the state changed (save it).
 *  - This primary has no tracking state but the secondary holds a replica (it
 *    adopted our volume id): continue its numbering, compare digests.
 *  - The secondary reports less than it acknowledged: its state (or its
 *    replica) was lost; never assume it still holds what it acknowledged.
 */
export function reconcileAfterHandshake(s: MirrorState, peerCommitted: number, applying: Applying | null): boolean {
  if (s.generation === 0 && s.pending === null && (peerCommitted > 0 || applying !== null)) {
    s.generation = s.committedGeneration = peerCommitted;
    requireReconcile(s, `this primary has no tracking state; the secondary holds generation ${peerCommitted}${applying ? ` and part of ${applying.generation}` : ''}`);
    return true;
  }
  if (peerCommitted < s.committedGeneration && s.pending === null) {
    // What the replica holds is not known any more: so is its age, until the comparison commits.
    s.committedViewAt = null;
    requireReconcile(s, `the secondary reports generation ${peerCommitted} but acknowledged ${s.committedGeneration}: its state was lost`);
    return true;
  }
  return false;
}

/** Where the pending generation resumes: the secondary's durable cursor when it was applying that generation, else 0. */
export function resumeCursor(s: MirrorState, applying: Applying | null): number {
  return applying && applying.generation === s.pending ? applying.cursor : 0;
}

/**
 * The replica's age in seconds (issue 15): `now` minus the moment the view
 * behind the last committed generation was taken, or the later moment
 * `seenAt` when a detection pass since found the volume unchanged from it
 * (Unix ms, held in memory). Writes made after that moment are what a
 * failover would lose; the volume may well have been written since, so this
 * is never 0 and never counts from the detection of a change. Null while no
 * committed generation has a known view time (before the first commit, or
 * after a reconciliation until it commits).
 */
export function lagSeconds(s: Pick<MirrorState, 'committedViewAt'>, now: number, seenAt: number | null = null): number | null {
  const at = Math.max(s.committedViewAt ?? -Infinity, seenAt ?? -Infinity);
  return Number.isFinite(at) ? Math.max(0, now - at) / 1000 : null;
}

/** Bytes of the chunks of `bitmap` at or above `fromChunk`, the volume's short tail counted as it is. */
export function bitmapBytes(bitmap: RoaringBitmap32, chunkSize: number, volumeSize: number, fromChunk = 0): number {
  const n = Math.ceil(volumeSize / chunkSize);
  let bytes = bitmap.rangeCardinality(fromChunk, n) * chunkSize;
  if (bitmap.has(n - 1) && n - 1 >= fromChunk) bytes -= n * chunkSize - volumeSize;
  return bytes;
}
