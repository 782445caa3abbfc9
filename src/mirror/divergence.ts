import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { RoaringBitmap32 } from '../track/bitmap-store.js';
import { removeDurably, writeFileAtomic } from '../util/atomic.js';

/**
 * `divergent.roaring` in a mirror's directory: the chunks this side changed
 * that the other side never committed (state.ts Divergence). Written before
 * the state names it, removed after the state stops naming it.
 */
export function divergentFile(dir: string): string {
  return path.join(dir, 'divergent.roaring');
}

export function serializeBitmap(b: RoaringBitmap32): Buffer {
  b.runOptimize();
  b.shrinkToFit();
  const bytes = b.serialize('portable');
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

export async function saveDivergent(dir: string, b: RoaringBitmap32): Promise<void> {
  await writeFileAtomic(divergentFile(dir), serializeBitmap(b));
}

export async function loadDivergent(dir: string): Promise<RoaringBitmap32> {
  const file = divergentFile(dir);
  let buf: Buffer;
  try {
    buf = await fsp.readFile(file);
  } catch (e) {
    throw asTmError(e, ErrorCodes.STATE, `reading the divergent chunks ${file}`);
  }
  try {
    return RoaringBitmap32.deserialize(buf, 'portable');
  } catch (e) {
    throw new TmError(ErrorCodes.STATE, `${file} is corrupt: ${(e as Error).message}`, { cause: e });
  }
}

export async function removeDivergent(dir: string): Promise<void> {
  await removeDurably(divergentFile(dir));
}
