import { expect } from 'chai';
import { spawn, type ChildProcess } from 'node:child_process';
import { Pair, sha256File } from '../helpers/pair.js';
import { StalenessProbe } from '../helpers/staleness.js';
import { LoopFs, requireTool } from '../helpers/xfs.js';

const MiB = 1024 * 1024;

/** Resolves when `p` exits; rejects on a non-zero status. */
function exited(p: ChildProcess, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    p.once('error', reject);
    p.once('exit', (code, signal) => (code === 0 || signal === 'SIGTERM' ? resolve() : reject(new Error(`${what} exited with ${code ?? signal}`))));
  });
}

describe('integration: issue 15, the reported lag is the replica\'s age', function () {
  this.timeout(300_000);
  let pair: Pair | undefined;
  let fs: LoopFs | undefined;
  let probe: StalenessProbe | undefined;
  let fio: ChildProcess | undefined;
  afterEach(async () => {
    if (fio && fio.exitCode === null) fio.kill('SIGKILL');
    fio = undefined;
    await probe?.stop();
    probe = undefined;
    await pair?.cleanup();
    await fs?.cleanup();
    pair = undefined;
    fs = undefined;
  });

  it('with a writer running, neither daemon ever reports a lag lower than the replica\'s real staleness by more than the sampling interval; idle, the view time moves on', async () => {
    requireTool('fio', 'fio');
    fs = await LoopFs.create('xfs', 1024 * MiB);
    pair = await Pair.create('vm1', fs.mount);
    const size = 128 * MiB;
    const fill = spawn('fio', ['--name=fill', `--filename=${pair.source}`, '--rw=write', '--bs=1m', `--size=${size}`], { stdio: 'ignore' });
    await exited(fill, 'fio (fill)');
    await pair.writeConfigs({ extraPrimary: { tracking: { mode: 'auto', interval: '1s' } } });
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const first = await pair.waitInSync(1);
    expect(first.trackingMode).to.equal('reflink');

    // What the daemons report: the smaller of the two (both must hold the property, so their minimum must).
    const reported: { primary: number | null; secondary: number | null }[] = [];
    const lag = async () => {
      const [p, s] = await Promise.all([pair!.primaryMirror(), pair!.secondaryMirror()]);
      reported.push({ primary: p.lagSeconds, secondary: s.lagSeconds });
      if (p.lagSeconds === null || s.lagSeconds === null) return null;
      return Math.min(p.lagSeconds, s.lagSeconds);
    };
    probe = new StalenessProbe(pair.source, pair.target, lag, { writeMs: 100, sampleMs: 500 });
    await probe.start();
    // Random 4-64 KiB writes beyond the probe's first MiB, for 20 s.
    fio = spawn(
      'fio',
      ['--name=w', `--filename=${pair.source}`, '--rw=randwrite', '--bssplit=4k/20:8k/20:16k/20:32k/20:64k/20', '--rate=8m', '--norandommap', `--offset=${MiB}`, `--size=${size - MiB}`, '--time_based', '--runtime=20'],
      { stdio: 'ignore' },
    );
    await exited(fio, 'fio (writer)');
    await probe.stop();

    const samples = probe.samples;
    expect(samples.length, 'samples of the replica').to.be.greaterThan(20);
    expect(reported.every((r) => r.primary !== null && r.secondary !== null), 'both daemons report a lag after the initial sync').to.equal(true);
    const worst = Math.max(...samples.map((s) => s.understatementSeconds ?? Infinity));
    expect(worst, `largest understatement of the real staleness (s); samples: ${JSON.stringify(samples.slice(0, 5))}`).to.be.at.most(probe.sampleMs / 1000);
    // The writes did reach the replica while they went on.
    expect(new Set(samples.map((s) => Math.round(s.at - s.stalenessSeconds * 1000))).size).to.be.greaterThan(2);

    // Idle: the mirror catches up, then each detection pass that finds nothing changed moves the view time on, on both sides.
    await pair.waitConverged(120_000);
    const viewAt = async () => {
      const [p, s] = await Promise.all([pair!.primaryMirror(), pair!.secondaryMirror()]);
      const now = Date.now();
      return { primary: now - p.lagSeconds! * 1000, secondary: now - s.lagSeconds! * 1000, generation: p.committedGeneration };
    };
    const a = await viewAt();
    await new Promise((r) => setTimeout(r, 3000));
    const b = await viewAt();
    expect(b.generation, 'nothing changed while idle').to.equal(a.generation);
    expect(b.primary).to.be.greaterThan(a.primary);
    expect(b.secondary).to.be.greaterThan(a.secondary);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
  });
});
