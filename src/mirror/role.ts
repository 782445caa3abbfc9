import { ErrorCodes, TmError } from '../errors.js';
import type { MirrorState, Role } from './state.js';

/**
 * Where a mirror's role changes, as a function over its state (the Mirror
 * stops the running role, applies this, saves, and starts the other role).
 * Promote and demote are built on it.
 *
 * secondary -> primary: only from a consistent replica (no generation partly
 * applied: a torn image must be rolled back first). The replica's committed
 * generation becomes the base the new primary counts from; having no tracking
 * state of its own yet, its first session compares digests with the peer
 * (never a full copy).
 *
 * primary -> secondary: the pending generation and its bitmap stay (what the
 * peer has not committed yet; failback needs it); nothing is being applied.
 */
/** The start of `reconcile` while a promoted side has not taken its tracking base yet (a crash then compares digests). */
export const PROMOTED = 'promoted at generation';

export function changeRole(s: MirrorState, to: Role, file: string): void {
  if (s.role === to) return;
  if (to === 'primary') {
    if (s.applying !== null) {
      throw new TmError(
        ErrorCodes.STATE,
        `${file}: generation ${s.applying.generation} is partly applied (durable up to ${s.applying.cursor}): the replica is not a consistent image of generation ${s.committedGeneration}, so it cannot become primary`,
      );
    }
    s.role = 'primary';
    s.generation = s.committedGeneration;
    s.pending = null;
    s.pendingGid = null;
    s.pendingViewAt = null;
    s.cursor = 0;
    s.oldestUncommittedAt = null;
    s.applyingGid = null;
    s.applyingViewAt = null;
    s.splitBrain = null;
    // Cleared once the change source has taken the volume as its base; a crash before that compares digests.
    s.reconcile = `${PROMOTED} ${s.committedGeneration}: the tracking base of this volume was not taken yet`;
    if (s.divergence) s.divergence.coveredBy = null;
    return;
  }
  s.role = 'secondary';
  s.applying = null;
  s.applyingGid = null;
  s.applyingViewAt = null;
  s.generation = s.committedGeneration;
  s.pending = null;
  s.pendingGid = null;
  s.pendingViewAt = null;
  s.cursor = 0;
  s.reconcile = null;
  s.oldestUncommittedAt = null;
  s.splitBrain = null;
}
