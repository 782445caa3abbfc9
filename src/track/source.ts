import type { Volume } from '../volume/volume.js';
import type { RoaringBitmap32 } from './bitmap-store.js';

export const TRACKING_MODES = ['auto', 'scan', 'reflink', 'lvm-thin'] as const;
/** `auto`: reflink where the volume's filesystem has it, scan elsewhere. */
export type TrackingMode = (typeof TRACKING_MODES)[number];

/** What a change source is built from: the parts of a mirror's config that concern tracking. */
export interface SourceConfig {
  /** The mirror's name, for messages. */
  name: string;
  /** Path of the source volume. */
  volume: string;
  chunkSize: number;
  tracking: { mode: TrackingMode };
  lvm?: { vg: string; pool: string };
}

/** What one detection pass found and cost. */
export interface Detection {
  /** Chunk indices whose content or allocation changed since the previous generation's view. */
  bitmap: RoaringBitmap32;
  /** Bytes read from the volume to find them (0 for metadata-based sources). */
  readBytes: number;
  /**
   * The source had no base to compare with (its tracking state was lost):
   * `bitmap` is every chunk, and the caller should find out what really
   * differs by comparing digests with the secondary instead of sending it all.
   */
  baseLost?: boolean;
  /**
   * Unix ms when the view was frozen (reflink: just before FICLONE; absent:
   * the caller takes the start of the pass, which is never later).
   */
  viewAt?: number;
  /** Where the pass's time went, in seconds (absent steps: not done or not measured). */
  steps?: DetectSteps;
}

/** Seconds per step of one detection pass. */
export interface DetectSteps {
  /** Freezing the view: FICLONE + fsync + rename (reflink), the thin snapshot (lvm-thin). */
  snapshot?: number;
  /** The translation maps of both views (FIEMAP). */
  fiemap?: number;
  /** Comparing the maps into a bitmap. */
  diff?: number;
}

export interface DetectOptions {
  /**
   * Every chunk counts as changed (initial sync, tracking state lost): the view
   * is still frozen, but nothing is compared.
   */
  all?: boolean;
  signal?: AbortSignal;
}

/**
 * A change source: the plug-in point for `tracking.mode`.
 *
 * Life of a generation N, as the primary drives it:
 * 1. `detect(N)` freezes the view generation N will be read from (a snapshot,
 *    or the live volume for sources that are not point-in-time) and returns the
 *    chunks that differ from generation N-1's view. Calling `detect(N)` again
 *    (after a crash before N was recorded) replaces that view.
 * 2. The primary writes bitmap N to disk, then reads N's chunks from `view(N)`
 *    (again after any restart, until N is committed).
 * 3. After the secondary's `committed(N)` the primary calls `committed(N)`:
 *    views older than N may go; N's view is the base of the next comparison.
 *
 * Sources that learn from content (scan) are told what was sent for each chunk
 * through `recordSent`; metadata sources ignore it.
 */
export interface ChangeSource {
  readonly mode: string;
  /** Load persisted tracking state. `generation`: the last generation created (0: none). */
  open(generation: number, committedGeneration: number): Promise<void>;
  detect(generation: number, opts?: DetectOptions): Promise<Detection>;
  /** The volume generation `generation` is read from. Owned by the source (do not close it). */
  view(generation: number): Promise<Volume>;
  /** The secondary made `generation` durable. */
  committed(generation: number): Promise<void>;
  /**
   * The sender read these bytes for chunk `chunk` and is sending them
   * (`data` null: `count` chunks from `chunk` travel as zeros / a hole).
   */
  recordSent(chunk: number, data: Buffer | null, count?: number): void;
  /**
   * Present on sources that keep digests (scan): the sender computed the
   * digests of what it sends for the chunks from `chunk` (DIGEST_BYTES each,
   * volume/digest.ts) off the main thread and hands them here instead of the
   * data to `recordSent`.
   */
  recordDigests?(chunk: number, digests: Buffer): void;
  /** Make tracking state durable (after a commit, at checkpoints). */
  persist(): Promise<void>;
  /** Forget tracking state: every chunk counts as changed at the next pass. */
  reset(): Promise<void>;
  /**
   * The volume as it is now is the image of committed generation
   * `generation` (a promoted replica, issue 12): make it the base of the next
   * comparison. Absent: the source cannot, and the first session compares digests.
   */
  rebase?(generation: number): Promise<void>;
  /** Remove every file of tracking state (the side is demoted to secondary). */
  drop?(): Promise<void>;
  close(): Promise<void>;
}
