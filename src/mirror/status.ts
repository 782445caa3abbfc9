import type { ErrorCode } from '../errors.js';
import type { CompressionStatus } from './compression.js';
import type { GenId, SplitBrain } from './history.js';

export type PrimaryPhase = 'connecting' | 'reconciling' | 'initial-sync' | 'syncing' | 'in-sync' | 'error' | 'stopped';

/** A comparison of digests with the secondary after tracking state was lost (the last one, kept in status). */
export interface ReconcileReport {
  reason: string;
  generation: number;
  doneBytes: number;
  totalBytes: number;
  /** Bytes of the chunks found different (sent as `generation`). */
  differingBytes: number;
  finished: boolean;
}

/** Progress of the generation being sent or applied, in bytes (of changed chunks when sending; of the volume when applying). */
export interface Progress {
  generation: number;
  doneBytes: number;
  totalBytes: number;
}
export type SecondaryPhase = 'waiting' | 'receiving' | 'idle' | 'error' | 'stopped';

/**
 * Seconds per step of a cycle (issue 15), in the order they run. Detection:
 * `snapshot` (freezing the view: FICLONE + fsync, a thin snapshot), `fiemap`
 * (the maps of both views), `diff` (comparing them), `save` (bitmap and
 * state on disk). Sending, as wall time of the send loop: `read` (waiting for
 * the view's reads and compression), `send` (framing and writing to the
 * socket), `apply` (waiting for the secondary's acks: it applies), `commit`
 * (from the commit frame to the secondary's committed). A step the change
 * source does not have is 0. They add up to about `durationSeconds`, less the
 * bookkeeping after the commit.
 */
export interface CycleSteps {
  snapshot: number;
  fiemap: number;
  diff: number;
  save: number;
  read: number;
  send: number;
  apply: number;
  commit: number;
}

/** Cost of the last completed cycle (primary). */
export interface CycleReport {
  generation: number;
  changedBytes: number;
  readBytes: number;
  wireBytes: number;
  /** From the start of the detection pass to the secondary's commit recorded here. */
  durationSeconds: number;
  /** Where that time went (absent for a generation resumed after a restart, whose detection happened before). */
  steps?: CycleSteps;
}

/** A drill in a secondary's status: its name, the clone's path, the committed generation it holds, seconds since it was taken. */
export interface DrillStatus {
  name: string;
  path: string;
  generation: number;
  ageSeconds: number;
}

/** One mirror's entry in GET /status. Byte counts are bytes; counters cover the daemon's lifetime. */
export interface MirrorStatus {
  name: string;
  role: 'primary' | 'secondary';
  state: PrimaryPhase | SecondaryPhase;
  volume: string;
  peer: string | null;
  trackingMode: string | null;
  chunkSize: number;
  volumeBytes: number;
  allocatedBytes: number;
  /** Primary: data payload bytes (before compression) sent over the mirror's life in this daemon; 0 on a secondary. */
  sentBytes: number;
  /** Secondary: data payload bytes (after decompression) written to the target; 0 on a primary. */
  appliedBytes: number;
  /** Frame bytes on the WebSocket, sent (primary) or received (secondary). */
  wireBytes: number;
  /** Bytes of chunks known to differ on the secondary (pending generation, not yet durable there). */
  dirtyBytes: number;
  generation: number;
  committedGeneration: number;
  /**
   * The replica's age (RPO now, issue 15): now minus when the view behind the
   * last committed generation was taken, or a later pass that found nothing
   * changed; the same on a secondary (from the primary's view times). Null
   * when unknown (before the first commit).
   */
  lagSeconds: number | null;
  /** Progress of the generation being sent or applied. */
  progress: Progress | null;
  lastCycle: CycleReport | null;
  /** Primary only: the last reconciliation by digests, null when there was none in this daemon's life. */
  reconcile?: ReconcileReport | null;
  /** Primary only: the compression mode, the codec in use (auto's choice), the ratio achieved and the rates auto measured. */
  compression?: CompressionStatus;
  /**
   * Secondary only: how the replica stays consistent. `mode` null until the
   * first session resolves it; `consistentGeneration` is the generation the
   * replica can be brought back to now (rollback), null when none (mode off
   * while a generation is applied: a torn image).
   */
  consistency?: { mode: 'reflink' | 'journal' | 'off' | null; reason: string | null; consistentGeneration: number | null };
  /** Secondary only: the drills kept (writable clones of the replica, docs/drills.md), oldest first. */
  drills?: DrillStatus[];
  error: { code: ErrorCode; message: string } | null;
  /** The last committed generation's identity (node, number, id), null before the first. */
  lastGeneration?: GenId | null;
  /** The config's `role` differs from the role the state holds (changed by promote/demote): the state's runs; this says so. */
  roleConflict?: string | null;
  /** Chunks this side changed that the peer never committed (kept for the reverse resync), null when none. */
  divergence?: { bytes: number; unknown: boolean; reason: string; since: GenId | null } | null;
  /** A split brain found with the peer, until resolved: the common generation, each side's changed bytes, and the command that resolves it. */
  splitBrain?: (SplitBrain & { resolve: string }) | null;
  /**
   * Sessions established (primary: handshake done; secondary: accepted) over
   * the life of this mirror object: it starts at 0 when the daemon starts the
   * mirror (at start, or when a config reload adds or changes it) and does not
   * move while the session lasts, so an unchanged count proves no reconnect.
   */
  sessions: number;
  /** ISO time the running session was established, null while there is none. */
  connectedSince: string | null;
}

/** What identifies a mirror in its status; the rest is counted or measured. */
export type StatusIdentity = Pick<MirrorStatus, 'name' | 'role' | 'state' | 'volume' | 'peer' | 'trackingMode' | 'chunkSize'>;

/** The status of a mirror that has nothing to report yet: every count zero, nothing in flight, no error. */
export function blankStatus(id: StatusIdentity): MirrorStatus {
  return {
    ...id,
    volumeBytes: 0,
    allocatedBytes: 0,
    sentBytes: 0,
    appliedBytes: 0,
    wireBytes: 0,
    dirtyBytes: 0,
    generation: 0,
    committedGeneration: 0,
    lagSeconds: null,
    progress: null,
    lastCycle: null,
    error: null,
    sessions: 0,
    connectedSince: null,
  };
}

