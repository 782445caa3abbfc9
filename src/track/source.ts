import type { RoaringBitmap32 } from './bitmap-store.js';

/** What one detection pass found and cost. */
export interface Detection {
  /** Chunk indices whose content or allocation changed since the previous pass. */
  bitmap: RoaringBitmap32;
  /** Bytes read from the volume to find them. */
  readBytes: number;
}

/**
 * A change source: the plug-in point for `tracking.mode`. It yields a roaring
 * bitmap of chunks per cycle; the mirror persists that bitmap as a generation
 * before sending it. Sources that learn from content (scan) are told what was
 * sent for each chunk so that the next pass compares against it.
 */
export interface ChangeSource {
  readonly mode: string;
  /** Load persisted tracking state. */
  open(): Promise<void>;
  /** Chunks changed since the last pass. */
  detect(signal?: AbortSignal): Promise<Detection>;
  /**
   * The sender read these bytes for chunk `chunk` and is sending them
   * (`data` null: `count` chunks from `chunk` travel as zeros / a hole).
   */
  recordSent(chunk: number, data: Buffer | null, count?: number): void;
  /** Make tracking state durable (after a commit, at checkpoints). */
  persist(): Promise<void>;
  /** Forget tracking state: every chunk counts as changed at the next pass. */
  reset(): Promise<void>;
  close(): Promise<void>;
}
