import { expect } from 'chai';
import { execFile as execFileCb, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import type { RoleChangeReport } from '../../src/mirror/mirror.js';
import type { MirrorStatus } from '../../src/mirror/status.js';
import { controlGet } from '../../src/daemon/control.js';
import { cli, FileWriter, Scene, sha256 } from '../helpers/mounted.js';
import { key, parseExposition } from '../helpers/prometheus.js';
import { createSampleVolume } from '../../src/util/sample.js';
import { freePort } from '../helpers/pair-config.js';
import { Pair, sha256File } from '../helpers/pair.js';
import { LoopFs, requireTool } from '../helpers/xfs.js';

const execFile = promisify(execFileCb);
const MiB = 1024 * 1024;

/**
 * Configs where each side can reach the other (issue 12 §1: no YAML edit at
 * failover): A listens too, B has a peer URL; reflink tracking on both.
 */
async function twoWayConfigs(p: Pair, extraA: Record<string, unknown> = {}): Promise<{ cfgA: string; cfgB: string }> {
  const portA = await freePort();
  await p.writeConfigs({
    // A refused side (split brain) retries after reconnect.max: short here, so that both sides see it soon.
    extraPrimary: { tracking: { mode: 'reflink', interval: '1s' }, reconnect: { min: '1s', max: '2s' }, ...extraA },
    extraSecondary: { tracking: { mode: 'reflink', interval: '1s' }, reconnect: { min: '1s', max: '2s' } },
  });
  const cfgA = p.cfg.primary;
  const cfgB = p.cfg.secondary;
  const yamlB = await fsp.readFile(cfgB, 'utf8');
  await fsp.writeFile(cfgA, (await fsp.readFile(cfgA, 'utf8')) + `listen:\n  host: 127.0.0.1\n  port: ${portA}\n`);
  await fsp.writeFile(cfgB, yamlB.replace(/(- name: vm1\n)/, `$1    peer: ws://127.0.0.1:${portA}\n`));
  expect(await fsp.readFile(cfgB, 'utf8')).to.contain(`peer: ws://127.0.0.1:${portA}`);
  return { cfgA, cfgB };
}

/** Overwrite `n` 64 KiB pieces of an image file at offsets chosen by `seed` (inside its first `span` bytes). */
async function scribble(file: string, seed: number, n: number, span: number): Promise<void> {
  const fh = await fsp.open(file, 'r+');
  try {
    for (let i = 0; i < n; i++) {
      const off = ((seed * 7919 + i * 104729) % Math.floor(span / (64 * 1024))) * 64 * 1024;
      await fh.write(randomBytes(64 * 1024), 0, 64 * 1024, off);
    }
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

async function fsck(image: string): Promise<{ code: number; out: string }> {
  return execFile('e2fsck', ['-fn', image]).then(
    () => ({ code: 0, out: '' }),
    (e: { code: number; stdout: string }) => ({ code: e.code, out: e.stdout }),
  );
}

/** Files written on a side while it is primary: name -> sha256. */
async function writeFiles(dir: string, prefix: string, n: number): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (let i = 0; i < n; i++) {
    const data = randomBytes(64 * 1024 * (1 + (i % 8)));
    await fsp.writeFile(path.join(dir, `${prefix}-${i}`), data);
    out.set(`${prefix}-${i}`, sha256(data));
  }
  execFileSync('sync', ['-f', dir]);
  return out;
}

async function expectFiles(dir: string, files: Map<string, string>, what: string): Promise<void> {
  for (const [name, sum] of files) expect(sha256(await fsp.readFile(path.join(dir, name))), `${what}: ${name}`).to.equal(sum);
}

describe('integration: failover, failback and switchover with real daemons (issue 12 §6)', function () {
  this.timeout(600_000);
  const sc = new Scene();

  before(() => {
    requireTool('mkfs.ext4', 'e2fsprogs');
    requireTool('e2fsck', 'e2fsprogs');
    requireTool('mkfs.xfs', 'xfsprogs');
  });

  afterEach(() => sc.cleanup());

  it('site A is lost mid-generation; B is promoted (consistent, fsck clean) and written; A comes back, is demoted and receives only the union; switchover back to A loses nothing; A -> B resumes', async () => {
    const fs = (sc.fs = await LoopFs.create('xfs', 3 * 1024 * MiB));
    const p = (sc.pair = await Pair.create('vm1', fs.mount));
    const fh = await fsp.open(p.source, 'w');
    await fh.truncate(256 * MiB);
    await fh.close();
    execFileSync('mkfs.ext4', ['-q', '-F', p.source], { stdio: 'pipe' });
    const { cfgA, cfgB } = await twoWayConfigs(p, { bandwidth: '8MiB/s' });

    // 1. An ext4 on the source, written by a writer on site A, files checksummed after sync.
    const src = await sc.mount(p.source, path.join(fs.dir, 'a'));
    await p.startSecondary().waitReady();
    await p.startPrimary().waitReady();
    await p.waitInSync(1, 120_000);
    const w = new FileWriter(src.dir, async () => (await p.primaryMirror()).generation);
    sc.writer = w;
    w.start();
    await p.secondary!.waitFor((s) => s.mirrors[0]!.committedGeneration >= 4, 120_000, 'generations with the writer running');

    // 2. Site A is lost mid-generation: its daemon SIGKILLed while B applies, its writer gone with it.
    // Paused (SIGSTOP) inside an apply first, so that the kill lands while B holds a partly applied generation.
    for (let attempt = 0; ; attempt++) {
      expect(attempt, 'attempts to catch the primary inside an apply').to.be.lessThan(20);
      await p.secondary!.waitFor((s) => s.mirrors[0]!.state === 'receiving', 60_000, 'a generation being applied', 10);
      process.kill(p.primary!.pid, 'SIGSTOP');
      await new Promise((r) => setTimeout(r, 300));
      const m = await p.secondaryMirror();
      if (m.state === 'receiving' && m.generation > m.committedGeneration) break;
      process.kill(p.primary!.pid, 'SIGCONT');
    }
    p.primary!.kill('SIGKILL');
    await p.primary!.exited;
    await w.stop();
    sc.writer = undefined;
    sc.unmount(src);
    const torn = await p.secondaryMirror();
    const committedB = torn.committedGeneration;

    // 3. promote B: rolled back to its last committed generation, primary, within seconds.
    const pr = await cli('promote', 'vm1', '--config', cfgB, '--json');
    expect(pr.code, pr.err).to.equal(0);
    const promoted = JSON.parse(pr.out) as RoleChangeReport;
    expect(promoted).to.include({ role: 'primary', committedGeneration: committedB });
    expect(promoted.warnings).to.deep.equal([]);
    expect(promoted.seconds, 'promote time').to.be.lessThan(5);
    // Killed inside an apply: the partly applied generation was rolled back.
    expect(torn.generation).to.equal(committedB + 1);
    expect(promoted.undone).to.equal(torn.generation);
    const bAfter: MirrorStatus = await p.secondaryMirror();
    expect(bAfter.role).to.equal('primary');
    expect(bAfter.roleConflict).to.match(/config says role secondary, but the mirror is primary/);
    // Mount B (the journal replays), every file synced before the last committed generation is there; fsck clean after.
    let b = await sc.mount(p.target, path.join(fs.dir, 'b'));
    const expected = w.files.filter((f) => f.syncedBefore + 2 <= committedB);
    expect(expected.length, 'files synced before the committed generation').to.be.at.least(5);
    for (const f of expected) expect(sha256(await fsp.readFile(path.join(b.dir, f.name))), f.name).to.equal(f.sha);
    sc.unmount(b);
    const f1 = await fsck(p.target);
    expect(f1.code, f1.out).to.equal(0);

    // 4. B is mounted, written and changed.
    b = await sc.mount(p.target, path.join(fs.dir, 'b'));
    const onB = await writeFiles(b.dir, 'b', 24);
    await fsp.rm(path.join(b.dir, expected[0]!.name));
    sc.unmount(b);

    // 5. A comes back as it was (primary): both are primary, refused as a split brain, nothing written.
    const bSha = await sha256File(p.target);
    p.startPrimary();
    await p.primary!.waitReady();
    const sb = await p.primary!.waitFor((s) => s.mirrors[0]!.splitBrain != null, 60_000, 'A to see the split brain');
    expect(sb.mirrors[0]!.splitBrain!.common!.generation).to.equal(committedB);
    expect(await sha256File(p.target)).to.equal(bSha);
    const mA = parseExposition((await controlGet(p.cfg.primaryState, '/metrics')).body);
    expect(mA.get(key('thinmirror_mirror_split_brain', { mirror: 'vm1', role: 'primary' }))).to.equal(1);
    const st = await cli('status', '--config', cfgA);
    expect(st.out).to.match(/split brain/);
    // A is demoted: what it changed after the common generation is kept for the resync.
    const dm = await cli('demote', 'vm1', '--config', cfgA, '--json');
    expect(dm.code, dm.err).to.equal(0);
    const demoted = JSON.parse(dm.out) as RoleChangeReport;
    expect(demoted.role).to.equal('secondary');
    const sentBefore = (await p.secondaryMirror()).sentBytes;
    // B, primary, connects to A and sends the union.
    const synced = await p.secondary!.waitFor(
      (s) => s.mirrors[0]!.state === 'in-sync' && s.mirrors[0]!.committedGeneration > committedB && s.mirrors[0]!.splitBrain === null,
      120_000,
      'the reverse resync',
    );
    const m = synced.mirrors[0]!;
    const sent = m.sentBytes - sentBefore;
    const union = m.lastCycle!.changedBytes;
    const allocated = m.allocatedBytes;
    expect(sent, 'bytes sent').to.be.at.most(1.1 * union);
    expect(union, 'the union is not the whole volume').to.be.lessThan(allocated / 2);
    expect(await sha256File(p.source)).to.equal(await sha256File(p.target));
    const aStat = await p.primaryMirror();
    expect(aStat).to.include({ role: 'secondary', committedGeneration: m.committedGeneration });
    expect(aStat.divergence).to.equal(null);
    const mA2 = parseExposition((await controlGet(p.cfg.primaryState, '/metrics')).body);
    expect(mA2.get(key('thinmirror_mirror_split_brain', { mirror: 'vm1', role: 'secondary' }))).to.equal(0);
    expect(aStat.consistency!.consistentGeneration).to.equal(m.committedGeneration);
    console.log(`      reverse resync: union ${union} bytes (A had changed ${demoted.divergentBytes}), sent ${sent} bytes; ${allocated} bytes allocated`);

    // 6. switchover back to A with zero loss: B is written once more, then hands over.
    b = await sc.mount(p.target, path.join(fs.dir, 'b'));
    const onB2 = await writeFiles(b.dir, 'b2', 8);
    sc.unmount(b);
    const sw = await cli('switchover', 'vm1', '--config', cfgB, '--json');
    expect(sw.code, sw.err).to.equal(0);
    const swr = JSON.parse(sw.out) as RoleChangeReport;
    expect(swr).to.include({ role: 'secondary', divergentBytes: 0 });
    await p.primary!.waitFor((s) => s.mirrors[0]!.role === 'primary' && s.mirrors[0]!.state === 'in-sync', 60_000, 'A primary again');
    const a = await sc.mount(p.source, path.join(fs.dir, 'a'));
    await expectFiles(a.dir, onB, 'written on B before the failback');
    await expectFiles(a.dir, onB2, 'written on B before the switchover');

    // 7. Replication A -> B resumes with nothing to resend.
    const sentA0 = (await p.primaryMirror()).sentBytes;
    const onA = await writeFiles(a.dir, 'a', 4);
    sc.unmount(a);
    const g = (await p.primaryMirror()).committedGeneration;
    await p.primary!.waitFor((s) => s.mirrors[0]!.committedGeneration > g && s.mirrors[0]!.state === 'in-sync', 60_000, 'A -> B');
    await p.waitConverged(60_000);
    const aFinal = await p.primaryMirror();
    const bFinal = await p.secondaryMirror();
    expect(aFinal.sentBytes - sentA0, 'A sends only what was written on it').to.be.lessThan(8 * MiB);
    expect(bFinal).to.include({ role: 'secondary', committedGeneration: aFinal.committedGeneration });
    expect(aFinal.roleConflict).to.equal(null);
    expect(bFinal.roleConflict).to.equal(null);
    const f2 = await fsck(p.target);
    expect(f2.code, f2.out).to.equal(0);
    const rb = await sc.mount(p.target, path.join(fs.dir, 'b'), 'loop,ro');
    await expectFiles(rb.dir, onA, 'written on A after the switchover');
    sc.unmount(rb);
    console.log(`      promote in ${promoted.seconds.toFixed(2)} s (generation ${committedB}, rolled back ${promoted.undone ?? 'nothing'}); switchover in ${swr.seconds.toFixed(2)} s; ${expected.length} files checked after the failover`);
  });

  for (const loser of ['A', 'B'] as const) {
    it(`split brain: both sides written after a forced promote are refused with nothing written; resolve --discard-local on ${loser} gives it the other's image`, async () => {
      const fs = (sc.fs = await LoopFs.create('xfs', 1024 * MiB));
      const p = (sc.pair = await Pair.create('vm1', fs.mount));
      await createSampleVolume(p.source, { size: 64 * MiB, allocated: 16 * MiB, extents: 16 });
      const { cfgA, cfgB } = await twoWayConfigs(p);
      await p.startSecondary().waitReady();
      await p.startPrimary().waitReady();
      await p.waitInSync(1, 60_000);
      // promote --force while A is connected: both are primary.
      const refused = await cli('promote', 'vm1', '--config', cfgB);
      expect(refused.code).to.equal(1);
      expect(refused.err).to.contain('TM_ERR_PEER_CONNECTED');
      await p.primary!.stop();
      const pr = await cli('promote', 'vm1', '--config', cfgB, '--force');
      expect(pr.code, pr.err).to.equal(0);
      // Both write.
      await scribble(p.source, 1, 20, 64 * MiB);
      await scribble(p.target, 2, 12, 64 * MiB);
      const [aSha, bSha] = [await sha256File(p.source), await sha256File(p.target)];
      p.startPrimary();
      await p.primary!.waitReady();
      const sbA = await p.primary!.waitFor((s) => s.mirrors[0]!.splitBrain != null && s.mirrors[0]!.splitBrain.peerBytes !== null, 60_000, 'A to see the split brain');
      const sbB = await p.secondary!.waitFor((s) => s.mirrors[0]!.splitBrain != null && s.mirrors[0]!.splitBrain.peerBytes !== null, 60_000, 'B to see the split brain');
      for (const st of [sbA, sbB]) {
        const sb = st.mirrors[0]!.splitBrain!;
        expect(sb.common!.generation).to.equal(1);
        expect(sb.localBytes).to.be.greaterThan(0);
        expect(sb.resolve).to.contain('thinmirror resolve vm1 --discard-local');
      }
      expect(sbA.mirrors[0]!.splitBrain!.localBytes).to.equal(sbB.mirrors[0]!.splitBrain!.peerBytes);
      expect(sbA.mirrors[0]!.error!.code).to.equal('TM_ERR_SPLIT_BRAIN');
      // Refused again and again: nothing written on either side.
      await new Promise((r) => setTimeout(r, 2500));
      expect([await sha256File(p.source), await sha256File(p.target)]).to.deep.equal([aSha, bSha]);
      const [loserCfg, winner, keptSha] = loser === 'A' ? [cfgA, p.secondary!, bSha] : [cfgB, p.primary!, aSha];
      const wrong = await cli('resolve', 'vm1', '--config', loserCfg);
      expect(wrong.code).to.equal(2);
      const r = await cli('resolve', 'vm1', '--discard-local', '--config', loserCfg, '--json');
      expect(r.code, r.err).to.equal(0);
      expect((JSON.parse(r.out) as RoleChangeReport).role).to.equal('secondary');
      await winner.waitFor((s) => s.mirrors[0]!.state === 'in-sync' && s.mirrors[0]!.splitBrain === null && s.mirrors[0]!.committedGeneration >= 2, 60_000, 'the resync after resolve');
      expect(await sha256File(p.source)).to.equal(keptSha);
      expect(await sha256File(p.target)).to.equal(keptSha);
      const w = (await winner.mirror('vm1'));
      expect(w.role).to.equal('primary');
      // Only the union travelled: at most the 32 pieces written on both sides (and their neighbours in a 64 KiB chunk), never the 16 MiB.
      expect(w.lastCycle!.changedBytes).to.be.at.most(32 * 64 * 1024);
    });
  }
});
