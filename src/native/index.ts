import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCodes, TmError } from '../errors.js';

/** The addon's functions (src/native/thinmirror.c). Offsets and lengths in bytes. */
export interface NativeOps {
  /** lseek SEEK_DATA: next data offset at or after `offset`, -1 when none (ENXIO). */
  seekData(fd: number, offset: number): number;
  /** lseek SEEK_HOLE: next hole offset at or after `offset`, -1 past the end (ENXIO). */
  seekHole(fd: number, offset: number): number;
  /** fallocate(PUNCH_HOLE | KEEP_SIZE). */
  punchHole(fd: number, offset: number, length: number): Promise<void>;
  /** fallocate(ZERO_RANGE | KEEP_SIZE). */
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
  /** ioctl BLKGETSIZE64: size of a block device in bytes. */
  blkGetSize64(fd: number): number;
  /** ioctl BLKDISCARD. */
  blkDiscard(fd: number, offset: number, length: number): Promise<void>;
}

function packageRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  while (!existsSync(path.join(dir, 'package.json'))) {
    const up = path.dirname(dir);
    if (up === dir) throw new TmError(ErrorCodes.NATIVE, 'cannot find the thinmirror package root (package.json)');
    dir = up;
  }
  return dir;
}

let cached: NativeOps | undefined;

/** Load build/Release/thinmirror_native.node once. Throws TM_ERR_NATIVE when it is missing. */
export function native(): NativeOps {
  if (cached) return cached;
  const file = path.join(packageRoot(), 'build', 'Release', 'thinmirror_native.node');
  try {
    cached = createRequire(import.meta.url)(file) as NativeOps;
  } catch (e) {
    throw new TmError(ErrorCodes.NATIVE, `cannot load the native addon ${file}: ${(e as Error).message}; run \`npm install\` (or \`npx node-gyp rebuild\`) to build it`, { cause: e });
  }
  return cached;
}
