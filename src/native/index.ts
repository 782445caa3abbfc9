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
  /**
   * SEEK_DATA / SEEK_HOLE over [from, to) on the threadpool: start and end of
   * each allocated range (an end may pass `to`), at most `maxRanges` of them;
   * fewer means the map ends before `to`.
   */
  seekMap(fd: number, from: number, to: number, maxRanges: number): Promise<Float64Array>;
  /** fallocate(PUNCH_HOLE | KEEP_SIZE). */
  punchHole(fd: number, offset: number, length: number): Promise<void>;
  /** fallocate(ZERO_RANGE | KEEP_SIZE). */
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
  /** ioctl BLKGETSIZE64: size of a block device in bytes. */
  blkGetSize64(fd: number): number;
  /** ioctl BLKDISCARD. */
  blkDiscard(fd: number, offset: number, length: number): Promise<void>;
  /** ioctl FICLONE: make `destFd` share every extent of `srcFd` (reflink; same filesystem). */
  ficlone(destFd: number, srcFd: number): Promise<void>;
  /**
   * ioctl FS_IOC_FIEMAP over [offset, offset + length): every mapped extent as
   * 4 numbers (logical, physical, length, flags). `sync` sets FIEMAP_FLAG_SYNC.
   */
  fiemap(fd: number, offset: number, length: number, sync: number): Promise<Float64Array>;
  /**
   * On the threadpool, one job for the whole list (pieces.c): for each i, read
   * exactly `lengths[i]` bytes at file offset `positions[i]` into `into`, the
   * pieces packed one after the other (piece i at the sum of the lengths before
   * it). Short reads and EINTR are retried. The end of the file before a piece
   * is complete rejects with code 'EOF_SHORT' (`position`: the offset it ended
   * at); a failed pread with the system error (code 'EIO'…, errno, syscall
   * 'pread', `position`). Throws a TypeError / RangeError for arguments that
   * are not integers >= 0, lengths that differ, more than 2^20 pieces or
   * lengths adding up to more than `into.byteLength`. Positions and lengths
   * are copied at the call; `into` must not be used until it settles.
   */
  preadPieces(fd: number, positions: Float64Array, lengths: Float64Array, into: Uint8Array): Promise<void>;
  /**
   * The write of {@link preadPieces}: the consecutive bytes of `data` to each
   * piece in turn, short writes and EINTR retried; a failed pwrite rejects
   * with the system error (code 'ENOSPC', 'EBADF'…, syscall 'pwrite',
   * `position`). The pieces written before it stay written.
   */
  pwritePieces(fd: number, positions: Float64Array, lengths: Float64Array, data: Uint8Array): Promise<void>;
  /** sd_notify: send `message` to the NOTIFY_SOCKET path; false when the path is empty. */
  sdNotify(socketPath: string, message: string): boolean;
  /** Decompress one LZ4 block (no size prefix) into `dst` (upstream LZ4_decompress_safe): bytes written, -1 when `src` is malformed or does not fit. */
  lz4DecompressInto(src: Uint8Array, dst: Uint8Array): number;
  /**
   * On the threadpool: CRC-32C of `src`, and `src` as uint32 LE length + one LZ4
   * block into `dst` when that is smaller than `src`. Resolves [bytes written
   * to dst (0: not smaller, nothing usable in dst), crc]. `src` and `dst` must
   * not overlap nor change until it resolves.
   */
  lz4CompressCrc(src: Uint8Array, dst: Uint8Array): Promise<[number, number]>;
  /** CRC-32C (Castagnoli) of `buf`, with the SSE4.2 instruction when the CPU has it. */
  crc32c(buf: Uint8Array): number;
  /** CRC-32C by tables only (what CPUs without SSE4.2 run; tests compare it with `crc32c`). */
  crc32cPortable(buf: Uint8Array): number;
  /** An AES-256-GCM key schedule for {@link gmacTag} / {@link gmacVerify} (gmac.c), freed with its handle. */
  gmacKey(key: Buffer): GmacKeyHandle;
  /** GMAC of `frame` (followed by `frame2` when given) under the handle's key with the nonce dir || 0 0 0 || u64be(seq): 16 bytes. */
  gmacTag(key: GmacKeyHandle, dir: number, seq: number, frame: Uint8Array, frame2?: Uint8Array): Buffer;
  /** Whether `tag` is that GMAC (constant-time comparison; false for another length). */
  gmacVerify(key: GmacKeyHandle, dir: number, seq: number, frame: Uint8Array, tag: Uint8Array): boolean;
  /**
   * On the threadpool: the digest of each `chunkSize` bytes of `buf` (the
   * last chunk may be short) into `out`, 16 bytes per chunk, as chunkDigest()
   * in volume/digest.ts computes it. `out` must hold exactly that many bytes
   * and not overlap `buf`; neither may change until it resolves.
   */
  chunkDigests(buf: Uint8Array, chunkSize: number, out: Uint8Array): Promise<void>;
}

/** An opaque key schedule made by {@link NativeOps.gmacKey}. */
export type GmacKeyHandle = { readonly __gmacKey: unique symbol };

/** FIEMAP extent flags (linux/fiemap.h). */
export const FiemapFlags = {
  LAST: 0x1,
  UNKNOWN: 0x2,
  DELALLOC: 0x4,
  ENCODED: 0x8,
  DATA_ENCRYPTED: 0x80,
  NOT_ALIGNED: 0x100,
  DATA_INLINE: 0x200,
  DATA_TAIL: 0x400,
  UNWRITTEN: 0x800,
  MERGED: 0x1000,
  SHARED: 0x2000,
} as const;

/** One FIEMAP extent, bytes. */
export interface FiemapExtent {
  logical: number;
  physical: number;
  length: number;
  flags: number;
}

/** FIEMAP of a whole file (or a range) as objects. */
export async function fiemap(fd: number, offset = 0, length = Number.MAX_SAFE_INTEGER - offset, sync = false): Promise<FiemapExtent[]> {
  const raw = await native().fiemap(fd, offset, length, sync ? 1 : 0);
  const out: FiemapExtent[] = [];
  for (let i = 0; i < raw.length; i += 4) {
    out.push({ logical: raw[i]!, physical: raw[i + 1]!, length: raw[i + 2]!, flags: raw[i + 3]! });
  }
  return out;
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
