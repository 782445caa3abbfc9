import { ErrorCodes, TmError } from '../errors.js';

const SIZE_UNITS: Record<string, number> = {
  '': 1, b: 1,
  k: 1024, kb: 1000, kib: 1024,
  m: 1024 ** 2, mb: 1000 ** 2, mib: 1024 ** 2,
  g: 1024 ** 3, gb: 1000 ** 3, gib: 1024 ** 3,
  t: 1024 ** 4, tb: 1000 ** 4, tib: 1024 ** 4,
};

/** Parse "64KiB", "4M", "1000" into bytes. Throws TM_ERR_PARSE. */
export function parseSize(input: string | number): number {
  if (typeof input === 'number') {
    if (Number.isSafeInteger(input) && input >= 0) return input;
    throw new TmError(ErrorCodes.PARSE, `invalid size ${input}: expected a non-negative integer`);
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(input);
  const unit = m ? SIZE_UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new TmError(ErrorCodes.PARSE, `invalid size "${input}": expected a number with an optional unit (B, KiB, MiB, GiB, TiB, KB, MB, ...)`);
  }
  const v = Math.round(Number(m[1]) * unit);
  if (!Number.isSafeInteger(v)) throw new TmError(ErrorCodes.PARSE, `size "${input}" is too large`);
  return v;
}

/**
 * Parse a bandwidth such as "100MiB/s", "50MB/s", "1GiB/s" or a number of
 * bytes per second into bytes per second (above zero). "/s" may be left out.
 * Bits ("Mbit/s") are refused rather than guessed: a cap is in bytes.
 */
export function parseRate(input: string | number): number {
  const text = typeof input === 'number' ? String(input) : input.replace(/\s*\/\s*s(ec)?\s*$/i, '');
  if (/bit/i.test(text)) throw new TmError(ErrorCodes.PARSE, `invalid bandwidth "${input}": give bytes per second, e.g. 12MiB/s rather than 100Mbit/s`);
  let v: number;
  try {
    v = parseSize(typeof input === 'number' ? input : text);
  } catch {
    throw new TmError(ErrorCodes.PARSE, `invalid bandwidth "${input}": expected bytes per second such as 100MiB/s, 50MB/s or 1GiB/s`);
  }
  if (v <= 0) throw new TmError(ErrorCodes.PARSE, `invalid bandwidth "${input}": expected more than zero bytes per second`);
  return v;
}

const DURATION_UNITS: Record<string, number> = { ms: 0.001, s: 1, '': 1, m: 60, min: 60, h: 3600 };

/** Parse "30s", "500ms", "2m", "1h" or a number of seconds into seconds. */
export function parseDuration(input: string | number): number {
  if (typeof input === 'number') {
    if (Number.isFinite(input) && input >= 0) return input;
    throw new TmError(ErrorCodes.PARSE, `invalid duration ${input}`);
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|)\s*$/.exec(input);
  if (!m) throw new TmError(ErrorCodes.PARSE, `invalid duration "${input}": expected e.g. 500ms, 30s, 5m, 1h`);
  return Number(m[1]) * DURATION_UNITS[m[2]!]!;
}

/** Human-readable binary size: 1536 -> "1.5 KiB". */
export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${n} B` : `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[i]}`;
}

/** True when n is a power of two between 4 KiB and 4 MiB: the allowed chunk sizes. */
export function isValidChunkSize(n: number): boolean {
  return Number.isInteger(n) && n >= 4096 && n <= 4 * 1024 * 1024 && (n & (n - 1)) === 0;
}
