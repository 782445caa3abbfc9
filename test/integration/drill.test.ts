import { expect } from 'chai';
import { execFile as execFileCb, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { controlGet } from '../../src/daemon/control.js';
import type { DrillInfo, DrillStarted } from '../../src/mirror/drill.js';
import type { MirrorStatus } from '../../src/mirror/status.js';
import { createSampleVolume } from '../../src/util/sample.js';
import { fileUsers } from '../../src/volume/file-users.js';
import { Pair, sha256File } from '../helpers/pair.js';
import { key, parseExposition } from '../helpers/prometheus.js';
import { LoopFs, requireTool } from '../helpers/xfs.js';
import { cli, FileWriter, Scene, sha256 } from '../helpers/mounted.js';

const execFile = promisify(execFileCb);
const MiB = 1024 * 1024;

describe('integration: a failover drill on the secondary while replication goes on (issue 11 §3)', function () {
  this.timeout(300_000);
  const sc = new Scene();

  before(() => {
    requireTool('mkfs.ext4', 'e2fsprogs');
    requireTool('e2fsck', 'e2fsprogs');
  });

  afterEach(() => sc.cleanup());

  it('clones the consistent image during an apply; the clone mounts, holds every file synced before its generation, fscks clean, stays apart from the replica; stop refused while mounted', async () => {
    const fs = (sc.fs = await LoopFs.create('xfs', 3 * 1024 * MiB));
    const p = (sc.pair = await Pair.create('vm1', fs.mount));
    // 1. The source holds an ext4, mounted on the primary's side. 1 GiB: the writer adds up to about
    // 4 MB/s of files and never deletes any, and this test ran for up to 142 s (a 512 MiB ext4 once filled up).
    const fh = await fsp.open(p.source, 'w');
    await fh.truncate(1024 * MiB);
    await fh.close();
    execFileSync('mkfs.ext4', ['-q', '-F', p.source], { stdio: 'pipe' });
    const src = await sc.mount(p.source, path.join(fs.dir, 'src'));
    // Reflink tracking: each generation is a point-in-time image of the source (crash consistent for the ext4).
    // The bandwidth cap makes applies last, so that a drill can start during one.
    await p.writeConfigs({ extraPrimary: { tracking: { mode: 'reflink', interval: '1s' }, bandwidth: '4MiB/s' } });
    await p.startSecondary().waitReady();
    await p.startPrimary().waitReady();
    await p.waitInSync(1, 120_000);
    const secondaryCfg = p.cfg.secondary;
    const sstate = p.cfg.secondaryState;
    const w = new FileWriter(src.dir, async () => (await p.primaryMirror()).generation);
    sc.writer = w;
    w.start();

    // 2. A drill started while a generation is applied. The primary is paused (SIGSTOP) inside an
    // apply so that the apply cannot end before the drill is taken, and so that its snapshot of
    // the committed generation (snap-G.img, kept while G+1 is pending) stays there to compare with.
    const sec = async () => p.secondaryMirror();
    const committedAtLeast = async (g: number, what: string) => p.secondary!.waitFor((s) => s.mirrors[0]!.committedGeneration >= g, 120_000, what);
    await committedAtLeast((await sec()).committedGeneration + 3, 'three generations with the writer running');
    for (let attempt = 0; ; attempt++) {
      expect(attempt, 'attempts to pause the primary inside an apply').to.be.lessThan(20);
      await p.secondary!.waitFor((s) => s.mirrors[0]!.state === 'receiving', 60_000, 'a generation being applied', 10);
      process.kill(p.primary!.pid, 'SIGSTOP');
      await new Promise((r) => setTimeout(r, 300)); // frames already sent are applied meanwhile
      if ((await sec()).state === 'receiving') break;
      process.kill(p.primary!.pid, 'SIGCONT');
    }
    let d: DrillStarted;
    let cloneSha: string;
    try {
      const m0 = await sec();
      expect(m0.consistency!.mode).to.equal('reflink');
      const started = await cli('drill', 'start', 'vm1', '--name', 'dr1', '--config', secondaryCfg, '--json');
      expect(started.code, started.err).to.equal(0);
      d = JSON.parse(started.out) as DrillStarted;
      expect(d).to.deep.include({ mirror: 'vm1', name: 'dr1', generation: m0.committedGeneration, from: 'base' });
      // The clone is exactly the image of generation G: the primary's snapshot G.
      cloneSha = await sha256File(d.path);
      expect(cloneSha).to.equal(await sha256File(path.join(p.cfg.primaryState, 'vm1', `snap-${d.generation}.img`)));
    } finally {
      process.kill(p.primary!.pid, 'SIGCONT');
    }
    const G = d.generation;
    expect(d.seconds).to.be.lessThan(2);
    expect(d.path).to.equal(`${p.target}.drill-dr1`);

    // status and metrics show it.
    const m1 = await sec();
    expect(m1.drills!.map((x) => [x.name, x.generation, x.path])).to.deep.equal([[d.name, G, d.path]]);
    const metrics = parseExposition((await controlGet(sstate, '/metrics')).body);
    expect(metrics.get(key('thinmirror_mirror_drills', { mirror: 'vm1', role: 'secondary' }))).to.equal(1);
    expect(metrics.get(key('thinmirror_drill_age_seconds', { mirror: 'vm1', role: 'secondary', drill: d.name }))).to.be.at.least(0);
    expect(metrics.get(key('thinmirror_drill_generation', { mirror: 'vm1', role: 'secondary', drill: d.name }))).to.equal(G);

    // 5. Replication goes on; the clone does not change.
    await committedAtLeast(G + 3, 'generations committing after the drill started');
    expect(await sha256File(d.path)).to.equal(cloneSha);

    // Drills survive a restart of the secondary (with the writer still running).
    await p.secondary!.stop();
    await p.startSecondary().waitReady();
    const listed = await cli('drill', 'list', '--config', secondaryCfg, '--json');
    expect(listed.code, listed.err).to.equal(0);
    expect((JSON.parse(listed.out) as DrillInfo[]).map((x) => [x.mirror, x.name, x.generation, x.path])).to.deep.equal([['vm1', d.name, G, d.path]]);
    const table = await cli('drill', 'list', '--config', secondaryCfg);
    expect(table.out).to.match(new RegExp(`vm1\\s+${d.name}\\s+${G}\\s`));

    // 3. The clone mounts (the ext4 journal is replayed) and holds every file synced before generation G was detected.
    const clone = await sc.mount(d.path, path.join(fs.dir, 'clone'));
    const expected = w.files.filter((f) => f.syncedBefore + 2 <= G);
    expect(expected.length, 'files synced before the drill generation').to.be.at.least(10);
    for (const f of expected) {
      const data = await fsp.readFile(path.join(clone.dir, f.name));
      expect(sha256(data), f.name).to.equal(f.sha);
    }

    // 4. Files written into the clone.
    const drillFiles: string[] = [];
    for (let i = 0; i < 8; i++) {
      const name = `drill-only-${i}`;
      await fsp.writeFile(path.join(clone.dir, name), randomBytes(MiB));
      drillFiles.push(name);
    }
    execFileSync('sync', ['-f', clone.dir]);

    // 6. drill stop is refused while the clone is mounted (the loop device holds it).
    const busy = await cli('drill', 'stop', 'vm1', d.name, '--config', secondaryCfg);
    expect(busy.code).to.equal(1);
    expect(busy.err).to.contain('TM_ERR_DRILL_BUSY');
    expect(busy.err).to.match(/loop device \/dev\/loop\d+/);

    // Generations kept committing during all of it.
    await committedAtLeast(G + 5, 'more generations while the clone is mounted');

    sc.unmount(clone);
    // mount -o loop detaches its loop device once released; that can lag the umount a little.
    for (let i = 0; i < 100 && (await fileUsers(d.path)).users.length > 0; i++) await new Promise((r) => setTimeout(r, 50));
    const fsck = await execFile('e2fsck', ['-fn', d.path]).then(
      () => ({ code: 0, out: '' }),
      (e: { code: number; stdout: string }) => ({ code: e.code, out: e.stdout }),
    );
    expect(fsck.code, fsck.out).to.equal(0);

    const stopped = await cli('drill', 'stop', 'vm1', d.name, '--config', secondaryCfg);
    expect(stopped.code, stopped.err).to.equal(0);
    expect(stopped.out).to.contain(`drill ${d.name} stopped`);
    expect(await fsp.stat(d.path).then(() => true, () => false)).to.equal(false);
    expect((await sec()).drills).to.deep.equal([]);
    const after = parseExposition((await controlGet(sstate, '/metrics')).body);
    expect(after.get(key('thinmirror_mirror_drills', { mirror: 'vm1', role: 'secondary' }))).to.equal(0);
    expect(after.has(key('thinmirror_drill_age_seconds', { mirror: 'vm1', role: 'secondary', drill: d.name }))).to.equal(false);

    // The replica never saw the drill's writes: at a quiescent point it equals the source, which fscks clean and lacks them.
    await w.stop();
    sc.unmount(src);
    await p.waitConverged(180_000);
    const replica = await sc.mount(p.target, path.join(fs.dir, 'replica'), 'loop,ro,noload');
    const names = new Set(await fsp.readdir(replica.dir));
    for (const n of drillFiles) expect(names.has(n), n).to.equal(false);
    for (const f of w.files) expect(names.has(f.name), f.name).to.equal(true);
    sc.unmount(replica);
    console.log(
      `      drill of generation ${G} in ${d.seconds.toFixed(3)} s; ${expected.length} of ${w.files.length} files checked in the clone; committed ${(await sec()).committedGeneration} generations in all`,
    );
  });

  it('on an ext4 target (consistency journal) drill start is refused with TM_ERR_DRILL_UNSUPPORTED naming the filesystem', async () => {
    const fs = (sc.fs = await LoopFs.create('ext4', 256 * MiB));
    const pair = (sc.pair = await Pair.create('vm1', fs.mount));
    await createSampleVolume(pair.source, { size: 32 * MiB, allocated: 4 * MiB, extents: 2 });
    await pair.writeConfigs();
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    await pair.waitInSync(1);
    const m: MirrorStatus = await pair.secondaryMirror();
    expect(m.consistency!.mode).to.equal('journal');
    const r = await cli('drill', 'start', 'vm1', '--name', 'x', '--config', pair.cfg.secondary);
    expect(r.code).to.equal(1);
    expect(r.err).to.contain('TM_ERR_DRILL_UNSUPPORTED');
    expect(r.err).to.contain(`ext4 (${fs.device} on ${fs.mount})`);
    expect(r.err).to.contain('XFS with reflink=1 or on btrfs');
    expect((await pair.secondaryMirror()).drills).to.deep.equal([]);
    // On the primary's host the mirror is not a secondary: refused too, coded.
    const onPrimary = await cli('drill', 'start', 'vm1', '--config', pair.cfg.primary);
    expect(onPrimary.code).to.equal(1);
    expect(onPrimary.err).to.contain('TM_ERR_UNKNOWN_MIRROR');
  });
});
