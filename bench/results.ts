import { promises as fsp, readFileSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Write a benchmark's figures as bench/results/<kind>-<date>.json; returns the file's path. */
export async function writeResult(kind: string, result: { date: string }): Promise<string> {
  const dir = path.join(path.dirname(fileURLToPath(import.meta.url)), 'results');
  await fsp.mkdir(dir, { recursive: true });
  const out = path.join(dir, `${kind}-${result.date.replace(/[:.]/g, '-')}.json`);
  await fsp.writeFile(out, JSON.stringify(result, null, 2) + '\n');
  return out;
}

/** Peak resident set (VmHWM) of a live process, in bytes; NaN when /proc does not say. */
export function peakRssBytes(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : NaN;
}

/** User + system CPU seconds a live process has used (its threads included). */
export function cpuSeconds(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  if (process.env.TM_BENCH_DEBUG) console.log(`pid ${pid} utime ${Number(fields[11]) / 100} s, stime ${Number(fields[12]) / 100} s`);
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ = 100)
}
