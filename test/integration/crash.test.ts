import { expect } from 'chai';
import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { prng, createSampleVolume } from '../../src/util/sample.js';
import { Pair, sha256File } from '../helpers/pair.js';
import { LoopFs } from '../helpers/xfs.js';

const MiB = 1024 * 1024;

/** Lines of a daemon's log files (all its restarts) that contain `text`. */
async function logLines(dir: string, prefix: string, text: string): Promise<string[]> {
  const out: string[] = [];
  for (const f of await fsp.readdir(dir)) {
    if (!f.startsWith(prefix) || !f.endsWith('.log')) continue;
    for (const line of (await fsp.readFile(path.join(dir, f), 'utf8')).split('\n')) if (line.includes(text)) out.push(line);
  }
  return out;
}

describe('integration: generations survive kill -9 at any moment (loop-mounted XFS, reflink tracking, a writer running)', function () {
  this.timeout(600_000);
  let fs: LoopFs | undefined;
  let pair: Pair | undefined;
  let writer: ChildProcess | undefined;

  afterEach(async () => {
    if (writer && writer.exitCode === null) writer.kill('SIGKILL');
    await pair?.cleanup();
    await fs?.cleanup();
  });

  it('20 rounds of SIGKILL to the primary or the secondary while a writer changes chunks: no change lost, no full resync', async () => {
    const seed = Number(process.env.TM_CRASH_SEED ?? Date.now() % 100000);
    const rand = prng(seed);
    fs = await LoopFs.create('xfs', 2048 * MiB);
    pair = await Pair.create('vm1', fs.mount);
    await createSampleVolume(pair.source, { size: 256 * MiB, allocated: 64 * MiB, extents: 32, seed, content: 'random' });
    await pair.writeConfigs({ interval: '1s', extraPrimary: { tracking: { mode: 'reflink', interval: '1s' } } });
    pair.startSecondary();
    pair.startPrimary();
    await pair.primary!.waitFor((s) => s.mirrors[0]?.trackingMode === 'reflink', 20_000, 'the primary to start with reflink');

    writer = spawn(process.execPath, ['--import', 'tsx', 'test/helpers/writer.ts', pair.source, String(seed), '30'], { stdio: ['ignore', 'pipe', 'inherit'] });
    let writerOut = '';
    writer.stdout!.on('data', (d: Buffer) => (writerOut += d.toString()));
    const kills = { primary: 0, secondary: 0 };
    for (let round = 0; round < 20; round++) {
      await new Promise((r) => setTimeout(r, 300 + Math.floor(rand() * 2200)));
      const victim = rand() < 0.5 ? 'primary' : 'secondary';
      const d = pair[victim]!;
      d.kill('SIGKILL');
      await d.exited;
      kills[victim]++;
      if (victim === 'primary') pair.startPrimary();
      else pair.startSecondary();
      // Up again (control socket answers) before the next round.
      await pair[victim]!.waitFor(() => true, 20_000, `${victim} restart in round ${round}`);
    }
    expect(writer.exitCode).to.equal(null, 'the writer ran through all rounds');
    writer.kill('SIGTERM');
    await new Promise((r) => writer!.once('exit', r));
    const { writes } = JSON.parse(writerOut) as { writes: number };
    expect(writes).to.be.greaterThan(50);

    // One more cycle after the writer stopped, committed: then identical.
    const stoppedAt = Date.now();
    await pair.primary!.waitFor(
      (s) => {
        const m = s.mirrors[0]!;
        return m.state === 'in-sync' && m.generation === m.committedGeneration && m.lastCycle !== null && Date.now() - stoppedAt > 2500;
      },
      120_000,
      'a committed cycle after the writer stopped',
    );
    // A detection pass may still find the writer's last changes: wait for the image to settle.
    const deadline = Date.now() + 60_000;
    let a = '';
    let b = '';
    for (;;) {
      [a, b] = [await sha256File(pair.source), await sha256File(pair.target)];
      if (a === b || Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    expect(b).to.equal(a, `target differs from source (seed ${seed}, kills ${JSON.stringify(kills)})\n${pair.primary!.logTail()}`);
    const m = await pair.primaryMirror();
    expect(m.trackingMode).to.equal('reflink');
    // Neither side ever fell back to sending every chunk.
    expect(await logLines(pair.dir, 'primary', 'every chunk')).to.deep.equal([]);
    expect(kills.primary + kills.secondary).to.equal(20);
    console.log(`      seed ${seed}: kills ${JSON.stringify(kills)}, ${writes} writes, final generation ${m.committedGeneration}`);
  });
});
