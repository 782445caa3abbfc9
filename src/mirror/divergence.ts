import * as path from 'node:path';
import { readBitmapFile, writeBitmapFile, type RoaringBitmap32 } from '../track/bitmap-store.js';
import { removeDurably } from '../util/atomic.js';

/**
 * `divergent.roaring` in a mirror's directory: the chunks this side changed
 * that the other side never committed (state.ts Divergence). Written before
 * the state names it, removed after the state stops naming it.
 */
export function divergentFile(dir: string): string {
  return path.join(dir, 'divergent.roaring');
}

export function saveDivergent(dir: string, b: RoaringBitmap32): Promise<void> {
  return writeBitmapFile(divergentFile(dir), b);
}

export function loadDivergent(dir: string): Promise<RoaringBitmap32> {
  return readBitmapFile(divergentFile(dir), 'the divergent chunks');
}

export async function removeDivergent(dir: string): Promise<void> {
  await removeDurably(divergentFile(dir));
}
