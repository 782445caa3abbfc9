import { expect } from 'chai';
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { pino } from 'pino';
import { TmError } from '../../src/errors.js';
import { Consistency } from '../../src/mirror/consistency.js';
import type { StateStore } from '../../src/mirror/context.js';
import { checkDrillName, defaultDrillName, drillPath, Drills } from '../../src/mirror/drill.js';
import type { MirrorConfig } from '../../src/mirror/settings.js';
import { newState, parseState, StateFile, type MirrorState } from '../../src/mirror/state.js';
import { sha256File } from '../../src/util/sha256.js';
import { fileUsers } from '../../src/volume/file-users.js';
import { filesystemOf, parseMountinfo } from '../../src/volume/filesystem.js';
import { SparseFileVolume } from '../../src/volume/sparse-file.js';
import { rejection } from '../helpers/rejection.js';
import { LoopFs } from '../helpers/xfs.js';

const MiB = 1024 * 1024;
const log = pino({ level: 'silent' });

async function code(p: Promise<unknown>): Promise<string> {
  const e = await rejection(p);
  expect(e).to.be.instanceOf(TmError);
  return (e as TmError).code;
}

async function gone(file: string): Promise<boolean> {
  return fsp.stat(file).then(
    () => false,
    () => true,
  );
}

/** Poll `f` until it holds (loop device teardown is asynchronous in the kernel). */
async function eventually(f: () => Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > end) throw new Error('condition not reached');
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('drills (mirror/drill, volume/file-users, volume/filesystem)', function () {
  this.timeout(60_000);

  describe('names and paths', () => {
    it('accepts letters, digits, . _ - up to 64, starting with a letter or digit; refuses the rest with TM_ERR_USAGE', () => {
      for (const ok of ['a', 'Drill-1', 'pre_upgrade.2025-01-02', '9', 'x'.repeat(64)]) expect(() => checkDrillName(ok), ok).not.to.throw();
      for (const bad of ['', '.', '..', '-x', '_x', 'x'.repeat(65), 'a/b', 'a b', 'é', 'a\n', '../etc']) {
        try {
          checkDrillName(bad);
          expect.fail(`accepted ${JSON.stringify(bad)}`);
        } catch (e) {
          expect((e as TmError).code, JSON.stringify(bad)).to.equal('TM_ERR_USAGE');
        }
      }
    });

    it('the default name holds the generation and the UTC time, and is a valid name', () => {
      const n = defaultDrillName(42, new Date('2025-01-02T03:04:05.678Z'));
      expect(n).to.equal('drill-42-20250102T030405Z');
      expect(() => checkDrillName(n)).not.to.throw();
    });

    it('the clone goes next to the target: <target>.drill-<name>', () => {
      expect(drillPath('/srv/replica/vm1.img', 'test1')).to.equal('/srv/replica/vm1.img.drill-test1');
    });
  });

  describe('state.json with drills', () => {
    let dir: string;
    beforeEach(async () => (dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tm-drill-state-'))));
    afterEach(() => fsp.rm(dir, { recursive: true, force: true }));
    const base = () => newState('secondary', { volumeId: 'ab12', volumeSize: 1 << 30, chunkSize: 65536, peerNode: 'site-a' });

    it('a format-2 file without drills still loads (files written before drills)', () => {
      const s = base();
      const { state } = parseState(JSON.parse(JSON.stringify(s)), 'f');
      expect(state.drills).to.equal(undefined);
    });

    it('drills round-trip through the state file', async () => {
      const f = new StateFile(dir);
      await f.init();
      const s: MirrorState = { ...base(), committedGeneration: 7, generation: 7, drills: [{ name: 'dr1', path: '/srv/vm1.img.drill-dr1', generation: 7, createdAt: 1_700_000_000_000 }] };
      await f.save(s);
      const loaded = await f.load();
      expect(loaded!.migrated).to.equal(false);
      expect(loaded!.state).to.deep.equal(s);
    });

    it('the schema stays strict: an unknown key in a drill, a bad name or a missing field is TM_ERR_STATE naming it', () => {
      const d = { name: 'dr1', path: '/x', generation: 1, createdAt: 1 };
      for (const [drill, field] of [
        [{ ...d, extra: 1 }, 'drills.0'],
        [{ ...d, name: '../x' }, 'drills.0.name'],
        [{ name: 'a', path: '/x', generation: 1 }, 'drills.0.createdAt'],
      ] as const) {
        try {
          parseState({ ...base(), drills: [drill] }, 'f');
          expect.fail('accepted');
        } catch (e) {
          expect((e as TmError).code).to.equal('TM_ERR_STATE');
          expect((e as Error).message).to.contain(field);
        }
      }
    });

    it('two saves asked at once leave the later state on disk', async () => {
      const f = new StateFile(dir);
      await f.init();
      const s = base();
      const a = f.save(s);
      s.drills = [{ name: 'late', path: '/x', generation: 0, createdAt: 1 }];
      const b = f.save(s);
      await Promise.all([a, b]);
      expect((await f.load())!.state.drills?.[0]?.name).to.equal('late');
    });
  });

  describe('fileUsers: what holds a file open', () => {
    let dir: string;
    let file: string;
    beforeEach(async () => {
      dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tm-users-'));
      file = path.join(dir, 'clone.img');
      await fsp.writeFile(file, Buffer.alloc(MiB));
    });
    afterEach(() => fsp.rm(dir, { recursive: true, force: true }));

    it('finds a descriptor of this process, by inode (another path to the file too), and not once it is closed', async () => {
      expect((await fileUsers(file)).users).to.deep.equal([]);
      const fh = await fsp.open(file, 'r');
      const link = path.join(dir, 'other-name');
      await fsp.link(file, link);
      try {
        const u = (await fileUsers(link)).users;
        expect(u).to.deep.equal([{ kind: 'process', pid: process.pid, command: u[0] && u[0].kind === 'process' ? u[0].command : '?', fd: fh.fd }]);
      } finally {
        await fh.close();
      }
      expect((await fileUsers(file)).users).to.deep.equal([]);
      expect(await fileUsers(path.join(dir, 'missing'))).to.deep.equal({ users: [], uninspected: 0 });
    });

    it('finds another process holding it, with its command name', async () => {
      const child = spawn('sh', ['-c', `exec 3<"${file}"; echo ready; exec sleep 30`], { stdio: ['ignore', 'pipe', 'inherit'] });
      try {
        await new Promise((r) => child.stdout!.once('data', r));
        await eventually(async () => (await fileUsers(file)).users.some((u) => u.kind === 'process' && u.pid === child.pid));
        const u = (await fileUsers(file)).users.find((x) => x.kind === 'process' && x.pid === child.pid)!;
        expect(u).to.deep.include({ kind: 'process', command: 'sleep', fd: 3 });
      } finally {
        child.kill('SIGKILL');
        await new Promise((r) => child.once('exit', r));
      }
      expect((await fileUsers(file)).users).to.deep.equal([]);
    });

    it('counts the processes it may not look into (run as nobody: the processes of root), and still finds its own descriptor', async () => {
      await fsp.chmod(dir, 0o755);
      await fsp.chmod(file, 0o644);
      const script = `import { openSync } from 'node:fs'; import { fileUsers } from ${JSON.stringify(path.resolve('src/volume/file-users.ts'))}; const fd = openSync(${JSON.stringify(file)}, 'r'); const r = await fileUsers(${JSON.stringify(file)}); console.log(JSON.stringify({ fd, pid: process.pid, r }));`;
      const out = execFileSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '--import', 'tsx', '--input-type=module', '-e', script], { encoding: 'utf8', cwd: process.cwd(), env: { ...process.env, HOME: '/tmp' } });
      const { fd, pid, r } = JSON.parse(out.trim().split('\n').at(-1)!) as { fd: number; pid: number; r: { users: unknown[]; uninspected: number } };
      expect(r.users).to.deep.equal([{ kind: 'process', pid, command: 'node', fd }]);
      expect(r.uninspected).to.be.greaterThan(0);
    });

    it('finds a loop device backed by it (no process holds a descriptor), and not after losetup -d', async () => {
      const dev = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
      try {
        expect((await fileUsers(file)).users).to.deep.equal([{ kind: 'loop', device: dev }]);
      } finally {
        execFileSync('losetup', ['-d', dev]);
      }
      await eventually(async () => (await fileUsers(file)).users.length === 0);
    });
  });

  describe('filesystemOf', () => {
    it('parses mountinfo lines, escaped paths included', () => {
      expect(parseMountinfo('36 35 98:0 / /mnt/my\\040disk rw,noatime master:1 - xfs /dev/loop3 rw,attr2')).to.deep.equal({ device: '98:0', mountPoint: '/mnt/my disk', type: 'xfs', source: '/dev/loop3' });
      expect(parseMountinfo('garbage')).to.equal(null);
    });

    it('names the type, device and mount point of a loop-mounted ext4 (also for a path that does not exist yet)', async () => {
      const fs = await LoopFs.create('ext4', 64 * MiB);
      try {
        expect(await filesystemOf(path.join(fs.mount, 'nope', 'x.img'))).to.deep.equal({ type: 'ext4', mountPoint: fs.mount, source: fs.device });
      } finally {
        await fs.cleanup();
      }
    });
  });

  describe('Drills on a real filesystem (a fake host around a state file)', () => {
    let fs: LoopFs | undefined;
    let dir: string;
    afterEach(async () => {
      await fs?.cleanup();
      fs = undefined;
    });

    /** A host: the target (random data), its state file with `committed` committed, the real consistency pick, and a turn the test can hold. */
    async function host(kind: 'xfs' | 'ext4', consistency: MirrorConfig['consistency'] = 'auto') {
      fs = await LoopFs.create(kind, 512 * MiB);
      dir = fs.mount;
      const target = path.join(dir, 'vm1.img');
      const fh = await fsp.open(target, 'w');
      await fh.write(randomBytes(4 * MiB), 0, 4 * MiB, 8 * MiB);
      await fh.truncate(64 * MiB);
      await fh.close();
      const config = { name: 'vm1', role: 'secondary', volume: target, chunkSize: 65536, consistency } as MirrorConfig;
      const sf = new StateFile(path.join(dir, 'state', 'vm1'));
      await sf.init();
      let state: MirrorState = { ...newState('secondary', { volumeId: 'ab', volumeSize: 64 * MiB, chunkSize: 65536 }), committedGeneration: 3, generation: 3 };
      await sf.save(state);
      const store: StateStore = {
        get state() {
          return state;
        },
        async set(s) {
          state = s;
          await sf.save(s);
        },
        // Save then swap, as a Mirror's store does.
        async update(change) {
          const next = structuredClone(state);
          const r = change(next);
          if (r !== false) {
            await sf.save(next);
            state = next;
          }
          return r;
        },
        file: sf.file,
        dir: sf.dir,
      };
      const v = await SparseFileVolume.open(target, { readOnly: true });
      const c = await Consistency.pick(config, sf.dir, v, log);
      await v.close();
      let turn: Promise<unknown> = Promise.resolve();
      const exclusive = <T>(job: () => Promise<T>): Promise<T> => {
        const run = turn.then(job);
        turn = run.catch(() => {});
        return run;
      };
      const drills = new Drills({ config, store, log, consistency: async () => c, exclusive });
      return { target, drills, store, sf, c, exclusive, reload: async () => (await sf.load())!.state };
    }

    it('idle: clones the target; the clone is a separate file (writes to it leave the target alone); recorded in state.json', async () => {
      const h = await host('xfs');
      const before = await sha256File(h.target);
      const d = await h.drills.start('t1');
      expect(d).to.deep.include({ mirror: 'vm1', name: 't1', path: `${h.target}.drill-t1`, generation: 3, from: 'target' });
      expect(await sha256File(d.path)).to.equal(before);
      const fh = await fsp.open(d.path, 'r+');
      await fh.write(Buffer.alloc(MiB, 7), 0, MiB, 9 * MiB);
      await fh.close();
      expect(await sha256File(h.target)).to.equal(before);
      expect((await h.reload()).drills).to.deep.equal([{ name: 't1', path: d.path, generation: 3, createdAt: Date.parse(d.createdAt) }]);
      expect(h.drills.status().map((x) => x.name)).to.deep.equal(['t1']);
      expect(await code(h.drills.start('t1'))).to.equal('TM_ERR_DRILL_EXISTS');
    });

    it('while a generation is applied: clones the base image of the committed generation, not the torn target', async () => {
      const h = await host('xfs');
      const committedImage = await sha256File(h.target);
      // What begin(4) does: the base of 3 first, then `applying`; then the target is written.
      await h.c.begin(null as never, 4, 3);
      await h.store.update((s) => void (s.applying = { generation: 4, cursor: 0 }));
      const fh = await fsp.open(h.target, 'r+');
      await fh.write(randomBytes(MiB), 0, MiB, 0);
      await fh.close();
      const d = await h.drills.start();
      expect(d.from).to.equal('base');
      expect(d.generation).to.equal(3);
      expect(d.name).to.match(/^drill-3-\d{8}T\d{6}Z$/);
      expect(await sha256File(d.path)).to.equal(committedImage);
      expect(await sha256File(h.target)).not.to.equal(committedImage);
    });

    it('waits for the replica turn: a begin/commit in progress finishes before the drill decides (and names it)', async () => {
      const h = await host('xfs');
      let release!: () => void;
      const held = h.exclusive(() => new Promise<void>((r) => (release = r)));
      let done = false;
      const p = h.drills.start().then((d) => ((done = true), d));
      await new Promise((r) => setTimeout(r, 200));
      expect(done).to.equal(false);
      // Meanwhile the "receiver" committed generation 4: the drill must see it.
      await h.store.update((s) => void (s.committedGeneration = 4));
      release();
      await held;
      const d = await p;
      expect(d.generation).to.equal(4);
      // A default name names the generation taken, not the one committed when it was asked.
      expect(d.name).to.match(/^drill-4-/);
    });

    it('stop is refused (TM_ERR_DRILL_BUSY naming the holder) while open or behind a loop device, works after, --force works while open', async () => {
      const h = await host('xfs');
      const d = await h.drills.start('busy');
      const fh = await fsp.open(d.path, 'r');
      const e = await rejection(h.drills.stop('busy'));
      expect((e as TmError).code).to.equal('TM_ERR_DRILL_BUSY');
      expect((e as Error).message).to.contain(`pid ${process.pid}`);
      await fh.close();
      const dev = execFileSync('losetup', ['-f', '--show', d.path], { encoding: 'utf8' }).trim();
      try {
        const e2 = await rejection(h.drills.stop('busy'));
        expect((e2 as TmError).code).to.equal('TM_ERR_DRILL_BUSY');
        expect((e2 as Error).message).to.contain(`loop device ${dev}`);
      } finally {
        execFileSync('losetup', ['-d', dev]);
      }
      await eventually(async () => (await fileUsers(d.path)).users.length === 0);
      const r = await h.drills.stop('busy');
      expect(r).to.deep.include({ deleted: true, users: [] });
      expect(await gone(d.path)).to.equal(true);
      expect((await h.reload()).drills).to.deep.equal([]);
      expect(await code(h.drills.stop('busy'))).to.equal('TM_ERR_DRILL_UNKNOWN');

      const d2 = await h.drills.start('forced');
      const fh2 = await fsp.open(d2.path, 'r');
      try {
        const r2 = await h.drills.stop('forced', true);
        expect(r2.deleted).to.equal(true);
        expect(r2.users).to.have.length(1);
      } finally {
        await fh2.close();
      }
    });

    it('a record whose clone is gone is removed by stop; a stray file under a drill name refuses start', async () => {
      const h = await host('xfs');
      const d = await h.drills.start('gone');
      await fsp.rm(d.path);
      expect(await h.drills.stop('gone')).to.deep.include({ deleted: false });
      await fsp.writeFile(`${h.target}.drill-stray`, 'x');
      expect(await code(h.drills.start('stray'))).to.equal('TM_ERR_DRILL_EXISTS');
      expect(await code(h.drills.start('bad/name'))).to.equal('TM_ERR_USAGE');
    });

    it('a generation being applied without its base image: TM_ERR_CONSISTENCY, nothing recorded, no file left', async () => {
      const h = await host('xfs');
      await h.store.update((s) => void (s.applying = { generation: 4, cursor: 0 }));
      expect(await code(h.drills.start('nobase'))).to.equal('TM_ERR_CONSISTENCY');
      expect(h.store.state!.drills ?? []).to.deep.equal([]);
      expect((await fsp.readdir(path.dirname(h.target))).filter((n) => n.includes('drill'))).to.deep.equal([]);
    });

    it('stale temp clones are removed at start', async () => {
      const h = await host('xfs');
      const tmp = path.join(path.dirname(h.target), '.vm1.img.drill-4242-0123abcd.tmp');
      await fsp.writeFile(tmp, 'half');
      await h.drills.removeStaleTemps();
      expect(await gone(tmp)).to.equal(true);
    });

    it('on ext4 (journal mode) start is refused with TM_ERR_DRILL_UNSUPPORTED naming the filesystem and what is needed', async () => {
      const h = await host('ext4');
      expect(h.c.choice.mode).to.equal('journal');
      const e = await rejection(h.drills.start('nope'));
      expect((e as TmError).code).to.equal('TM_ERR_DRILL_UNSUPPORTED');
      expect((e as Error).message).to.contain(`ext4 (${fs!.device} on ${fs!.mount})`);
      expect((e as Error).message).to.contain('XFS with reflink=1 or on btrfs');
      expect((await h.reload()).drills).to.equal(undefined);
    });

    it('consistency: off is refused too (no consistent image while a generation is applied)', async () => {
      const h = await host('xfs', 'off');
      const e = await rejection(h.drills.start('nope'));
      expect((e as TmError).code).to.equal('TM_ERR_DRILL_UNSUPPORTED');
      expect((e as Error).message).to.contain('consistency: off');
    });

    it('before any committed generation there is nothing to drill on: TM_ERR_STATE', async () => {
      const h = await host('xfs');
      await h.store.update((s) => void (s.committedGeneration = 0));
      expect(await code(h.drills.start('early'))).to.equal('TM_ERR_STATE');
    });
  });
});
