import { expect } from 'chai';
import {
  strippedCeiling,
  childCpuSeconds,
  linkPlan,
  linkSetupCommands,
  linkTeardownCommands,
  linkVerdicts,
  missingToolsMessage,
  neededTools,
  SHAPED_LINK,
  shapingVerified,
  tbfSizes,
  unionRanges,
  type RunFigures,
} from '../../bench/link-plan.js';

const GiB = 1024 ** 3;
const fig = (seconds: number, identical = true): RunFigures => ({ seconds, allocatedBytes: GiB, identical, targetAllocatedBytes: GiB });

describe('link bench plan (bench/link-plan.ts)', () => {
  it('selects everything by default and writes no compression key', () => {
    const p = linkPlan({});
    expect(p.data).to.deep.equal(['text', 'random']);
    expect(p).to.include({ loopback: true, shaped: true, compression: null, rateBits: 1e9 });
    expect(p.runs).to.deep.equal(['thinmirror', 'stripped', 'checked', 'nbdcopy', 'cp', 'rsync']);
  });

  it('narrows to one data set, one case and some runs, and refuses unknown names', () => {
    const p = linkPlan({ TM_BENCH_LINK_DATA: 'random', TM_BENCH_LINK_CASE: 'shaped', TM_BENCH_LINK_RUNS: 'thinmirror,nbdcopy', TM_BENCH_COMPRESSION: 'lz4', TM_BENCH_LINK_MBIT: '100' });
    expect(p).to.deep.include({ data: ['random'], loopback: false, shaped: true, runs: ['thinmirror', 'nbdcopy'], compression: 'lz4', rateBits: 1e8 });
    expect(() => linkPlan({ TM_BENCH_LINK_DATA: 'zeros' })).to.throw(/TM_BENCH_LINK_DATA=zeros/);
    expect(() => linkPlan({ TM_BENCH_LINK_CASE: 'wan' })).to.throw(/TM_BENCH_LINK_CASE/);
    expect(() => linkPlan({ TM_BENCH_COMPRESSION: 'zstd' })).to.throw(/auto, lz4 or off/);
    expect(() => linkPlan({ TM_BENCH_LINK_MBIT: '-1' })).to.throw(/TM_BENCH_LINK_MBIT/);
  });

  it('names the Debian package of each missing tool', () => {
    const tools = neededTools(linkPlan({}));
    expect(tools.map((t) => t.command)).to.have.members(['sync', 'nbdkit', 'nbdcopy', 'cp', 'rsync', 'ip', 'tc']);
    expect(neededTools(linkPlan({ TM_BENCH_LINK_CASE: 'loopback', TM_BENCH_LINK_RUNS: 'thinmirror' })).map((t) => t.command)).to.deep.equal(['sync']);
    const missing = tools.filter((t) => ['nbdcopy', 'ip', 'tc'].includes(t.command));
    expect(missingToolsMessage(missing)).to.equal('the link bench needs nbdcopy, ip, tc: apt-get install libnbd-bin iproute2');
    expect(missingToolsMessage([])).to.equal(null);
  });

  it('sizes the tbf for the rate and builds the link in the primary namespace', () => {
    expect(tbfSizes(1e9)).to.deep.equal({ burstBytes: 489 * 1024, limitBytes: 2442 * 1024 });
    // A slow link keeps a burst that holds two GSO segments and a queue of four bursts.
    expect(tbfSizes(1e6)).to.deep.equal({ burstBytes: 128 * 1024, limitBytes: 512 * 1024 });
    const cmds = linkSetupCommands(SHAPED_LINK, 1e9);
    expect(cmds.at(-1)).to.deep.equal(['tc', '-n', 'tmlink-a', 'qdisc', 'replace', 'dev', 'tmlink-a0', 'root', 'tbf', 'rate', '1000000000bit', 'burst', '500736', 'limit', '2500608']);
    expect(cmds[2]).to.deep.equal(['ip', 'link', 'add', 'tmlink-a0', 'netns', 'tmlink-a', 'type', 'veth', 'peer', 'name', 'tmlink-b0', 'netns', 'tmlink-b']);
    expect(linkTeardownCommands(SHAPED_LINK)).to.deep.equal([
      ['ip', 'netns', 'del', 'tmlink-a'],
      ['ip', 'netns', 'del', 'tmlink-b'],
    ]);
  });

  it('checks the measured rate against what the tbf lets through', () => {
    const s = shapingVerified(119.8e6, 1e9);
    expect(s.expectedBytesPerSecond).to.be.closeTo(119.55e6, 0.01e6);
    expect(s.ok).to.equal(true);
    expect(shapingVerified(400e6, 1e9).ok).to.equal(false);
    expect(shapingVerified(60e6, 1e9).ok).to.equal(false);
  });

  it('gives the ratios against the stripped pipeline, nbdcopy and the link, and flags what misses', () => {
    const v = linkVerdicts('text', {
      loopback: { thinmirror: { ...fig(4), generationSeconds: 3.5 }, stripped: fig(3.8), nbdcopy: fig(2) },
      shaped: { thinmirror: fig(3) },
      linkBytesPerSecond: 120e6,
      peakRss: { 'loopback primary': 150 * 1024 * 1024, 'loopback secondary': 250 * 1024 * 1024 },
    });
    const byName = Object.fromEntries(v.map((x) => [x.name, x]));
    expect(byName['text: thinmirror / stripped (loopback)']!.value).to.be.closeTo(0.95, 1e-9);
    expect(byName['text: thinmirror / stripped (loopback)']!.met).to.equal(true);
    expect(byName['text: thinmirror generation alone / stripped (loopback)']!.value).to.be.closeTo(3.8 / 3.5, 1e-9);
    expect(byName['text: thinmirror / nbdcopy (loopback)']!).to.include({ value: 0.5, met: false });
    expect(byName['text: thinmirror / link rate (shaped)']!.value).to.be.closeTo(GiB / 3 / 120e6, 1e-9);
    expect(byName['text: thinmirror / link rate (shaped)']!).to.include({ target: 2.5, met: true });
    expect(v.filter((x) => x.name.includes('RSS')).map((x) => [x.name, x.met])).to.deep.equal([
      ['text: peak RSS of the loopback primary (MiB)', true],
      ['text: peak RSS of the loopback secondary (MiB)', false],
    ]);
    const r = linkVerdicts('random', { shaped: { thinmirror: fig(10), nbdcopy: fig(9, false) }, linkBytesPerSecond: 120e6 });
    expect(r.map((x) => [x.name, x.target, x.met])).to.deep.equal([
      ['random: thinmirror / link rate (shaped)', 0.9, false],
      ['random: nbdcopy image identical', 1, false],
    ]);
  });

  it('the ceiling is the stripped pipeline with checks against the stripped one, and is not a verdict', () => {
    expect(strippedCeiling({ stripped: fig(2), checked: fig(2.5) })).to.be.closeTo(0.8, 1e-9);
    expect(strippedCeiling({ stripped: fig(2) })).to.equal(null);
    expect(strippedCeiling(undefined)).to.equal(null);
    const v = linkVerdicts('text', { loopback: { thinmirror: fig(4), stripped: fig(2), checked: fig(2.5) } });
    expect(v.map((x) => x.name)).to.deep.equal(['text: thinmirror / stripped (loopback)']);
  });

    it('merges allocation maps and reads bash times', () => {
    expect(
      unionRanges([
        { offset: 100, length: 10 },
        { offset: 0, length: 50 },
        { offset: 40, length: 20 },
        { offset: 110, length: 5 },
        { offset: 200, length: 0 },
      ]),
    ).to.deep.equal([
      { offset: 0, length: 60 },
      { offset: 100, length: 15 },
    ]);
    expect(childCpuSeconds('0m0.003s 0m0.001s\n1m2.500s 0m0.250s\n')).to.be.closeTo(62.75, 1e-9);
    expect(childCpuSeconds('')).to.be.NaN;
  });
});
