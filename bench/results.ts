import { promises as fsp } from 'node:fs';
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
