/**
 * A writer process for crash tests: changes random ranges of a file (4 KiB to
 * 1 MiB writes of random bytes, now and then a punched hole) until SIGTERM,
 * then exits 0 after its last write returned.
 *
 *   node --import tsx test/helpers/writer.ts FILE SEED [PAUSE_MS]
 */
import { randomFillSync } from 'node:crypto';
import { closeSync, fstatSync, openSync, writeSync } from 'node:fs';
import { native } from '../../src/native/index.js';
import { prng } from '../../src/util/sample.js';

const [file, seedArg, pauseArg] = process.argv.slice(2);
if (!file || !seedArg) {
  console.error('usage: writer.ts FILE SEED [PAUSE_MS]');
  process.exit(2);
}
const rand = prng(Number(seedArg));
const pause = Number(pauseArg ?? 20);
const fd = openSync(file, 'r+');
const size = fstatSync(fd).size;
const buf = Buffer.alloc(1024 * 1024);
let stop = false;
let writes = 0;
process.on('SIGTERM', () => (stop = true));

async function main(): Promise<void> {
  while (!stop) {
    const len = 4096 * (1 + Math.floor(rand() * 256));
    const off = Math.min(size - len, 4096 * Math.floor((rand() * size) / 4096));
    if (rand() < 0.1) {
      await native().punchHole(fd, off, len);
    } else {
      randomFillSync(buf, 0, len);
      writeSync(fd, buf, 0, len, off);
    }
    writes++;
    await new Promise((r) => setTimeout(r, pause));
  }
  closeSync(fd);
  process.stdout.write(`${JSON.stringify({ writes })}\n`);
}
void main();
