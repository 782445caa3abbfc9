import type { ErrorCode } from '../errors.js';

export type PrimaryPhase = 'connecting' | 'initial-sync' | 'syncing' | 'in-sync' | 'error' | 'stopped';
export type SecondaryPhase = 'waiting' | 'receiving' | 'idle' | 'error' | 'stopped';

/** Cost of the last completed cycle (primary). */
export interface CycleReport {
  generation: number;
  changedBytes: number;
  readBytes: number;
  wireBytes: number;
  durationSeconds: number;
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
  /** Data payload bytes before compression sent (primary) or applied (secondary). */
  sentBytes: number;
  /** Frame bytes on the WebSocket, sent (primary) or received (secondary). */
  wireBytes: number;
  /** Bytes of chunks known to differ on the secondary (pending generation, not yet durable there). */
  dirtyBytes: number;
  generation: number;
  committedGeneration: number;
  /** Age of the oldest change not yet committed on the secondary (RPO now); 0 when in sync; null when unknown. */
  lagSeconds: number | null;
  /** Progress of the generation being sent or applied. */
  progress: { generation: number; doneBytes: number; totalBytes: number } | null;
  lastCycle: CycleReport | null;
  error: { code: ErrorCode; message: string } | null;
}
