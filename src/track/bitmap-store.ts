import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import roaring from 'roaring';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { removeDurably, writeFileAtomic } from '../util/atomic.js';

export const { RoaringBitmap32 } = roaring;
export type RoaringBitmap32 = InstanceType<typeof roaring.RoaringBitmap32>;

/**
 * Generation bitmaps on disk: `gen-<N>.roaring` in the mirror's state directory,
 * portable roaring serialization, written atomically. Each bit is a chunk index.
 * A bitmap is written before any of its data is sent and removed only after the
 * secondary has acknowledged the generation.
 */
/** The portable roaring serialization of `bitmap` (run-optimized first). */
export function serializeBitmap(bitmap: RoaringBitmap32): Buffer {
  bitmap.runOptimize();
  bitmap.shrinkToFit();
  const bytes = bitmap.serialize('portable');
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Write `bitmap` to `file` atomically (portable roaring). */
export async function writeBitmapFile(file: string, bitmap: RoaringBitmap32): Promise<void> {
  await writeFileAtomic(file, serializeBitmap(bitmap));
}

/** Read a bitmap written by {@link writeBitmapFile}; TM_ERR_STATE naming `what` and the file when it is unreadable or corrupt. */
export async function readBitmapFile(file: string, what: string): Promise<RoaringBitmap32> {
  let buf: Buffer;
  try {
    buf = await fsp.readFile(file);
  } catch (e) {
    throw asTmError(e, ErrorCodes.STATE, `reading ${what} ${file}`);
  }
  try {
    return RoaringBitmap32.deserialize(buf, 'portable');
  } catch (e) {
    throw new TmError(ErrorCodes.STATE, `${what} ${file} is corrupt: ${(e as Error).message}`, { cause: e });
  }
}

export class BitmapStore {
  constructor(readonly dir: string) {}

  fileFor(generation: number): string {
    return path.join(this.dir, `gen-${generation}.roaring`);
  }

  async save(generation: number, bitmap: RoaringBitmap32): Promise<void> {
    await writeBitmapFile(this.fileFor(generation), bitmap);
  }

  load(generation: number): Promise<RoaringBitmap32> {
    return readBitmapFile(this.fileFor(generation), 'bitmap');
  }

  async remove(generation: number): Promise<void> {
    await removeDurably(this.fileFor(generation));
  }

  /** Generations that have a bitmap on disk, ascending. */
  async list(): Promise<number[]> {
    let names: string[];
    try {
      names = await fsp.readdir(this.dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw asTmError(e, ErrorCodes.STATE, `listing ${this.dir}`);
    }
    return names
      .map((n) => /^gen-(\d+)\.roaring$/.exec(n))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => Number(m[1]))
      .sort((a, b) => a - b);
  }
}

/**
 * Runs of consecutive set bits at or above `fromChunk`, ascending, as
 * [start, end) chunk indices. Pages through the bitmap in windows so that a
 * bitmap of millions of chunks never becomes one array.
 */
export function* bitmapRuns(bitmap: RoaringBitmap32, fromChunk = 0): Generator<[number, number]> {
  const WINDOW = 1 << 16;
  let runStart = -1;
  let runEnd = -1;
  // rangeUint32Array(index, count) pages by rank: start at the first value >= fromChunk.
  let index = fromChunk > 0 ? bitmap.rank(fromChunk - 1) : 0;
  for (;;) {
    const values = bitmap.rangeUint32Array(index, WINDOW);
    for (let i = 0; i < values.length; i++) {
      const v = values[i]!;
      if (v === runEnd) {
        runEnd++;
      } else {
        if (runStart >= 0) yield [runStart, runEnd];
        runStart = v;
        runEnd = v + 1;
      }
    }
    if (values.length < WINDOW) break;
    index += values.length;
  }
  if (runStart >= 0) yield [runStart, runEnd];
}
