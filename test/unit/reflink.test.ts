import { expect } from 'chai';
import { constants as fsc, promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fiemap, FiemapFlags, native } from '../../src/native/index.js';
import { diffMaps, ReflinkSource, reflinkUsable } from '../../src/track/reflink.js';
import { LoopFs } from '../helpers/xfs.js';

const K = 1024;
const CS = 64 * K;
const e = (logical: number, physical: number, length: number, flags = 0) => ({ logical, physical, length, flags });

describe('reflink change source', () => {
  describe('diffMaps (FIEMAP translation maps compared)', () => {
    const size = 16 * CS;
    it('identical maps mark nothing; a moved physical address marks exactly the chunks it covers', () => {
      const a = [e(0, 1 << 20, 4 * CS), e(8 * CS, 9 << 20, 2 * CS, FiemapFlags.LAST)];
      expect(diffMaps(a, a, size, CS).toArray()).to.deep.equal([]);
      // 4 KiB of chunk 1 rewritten elsewhere (copy-on-write): the map splits in three.
      const b = [e(0, 1 << 20, CS + 8 * K), e(CS + 8 * K, 50 << 20, 4 * K), e(CS + 12 * K, (1 << 20) + CS + 12 * K, 3 * CS - 12 * K), a[1]!];
      expect(diffMaps(a, b, size, CS).toArray()).to.deep.equal([1]);
    });
    it('allocation changes count, unwritten extents read as holes, the shared flag is ignored', () => {
      const a = [e(0, 1 << 20, 2 * CS)];
      const b = [e(0, 1 << 20, CS, FiemapFlags.SHARED), e(3 * CS, 7 << 20, CS, FiemapFlags.UNWRITTEN), e(5 * CS, 8 << 20, CS, FiemapFlags.LAST)];
      // chunk 1 deallocated (hole now), chunk 3 preallocated (still zeros), chunk 5 new data.
      expect(diffMaps(a, b, size, CS).toArray()).to.deep.equal([1, 5]);
    });
    it('extents with opaque addresses (encoded, inline) are unchanged only when reported identically', () => {
      const enc = e(0, 1 << 20, 2 * CS, FiemapFlags.ENCODED);
      expect(diffMaps([enc], [enc], size, CS).toArray()).to.deep.equal([]);
      // Same delta logical→physical but a different extent: cannot be trusted.
      expect(diffMaps([enc], [e(CS, (1 << 20) + CS, CS, FiemapFlags.ENCODED)], size, CS).toArray()).to.deep.equal([0, 1]);
    });
    it('an extent past the end of the volume is clipped; a partial tail chunk is marked', () => {
      const tailSize = 3 * CS + 100;
      expect(diffMaps([], [e(3 * CS, 1 << 20, CS, FiemapFlags.LAST)], tailSize, CS).toArray()).to.deep.equal([3]);
      expect(diffMaps([], [e(8 * CS, 1 << 20, CS)], tailSize, CS).toArray()).to.deep.equal([]);
    });
  });

  describe('on a loop-mounted XFS (reflink=1)', function () {
    this.timeout(120_000);
    let fs: LoopFs;
    let vol: string;
    let state: string;
    before(async () => {
      fs = await LoopFs.create('xfs', 1024 * 1024 * 1024);
      vol = path.join(fs.mount, 'vol.img');
      state = path.join(fs.mount, 'state');
      await fsp.mkdir(state);
    });
    after(async () => {
      await fs?.cleanup();
    });

    const size = 8 * 1024 * 1024;
    const fill = (n: number, v: number) => Buffer.alloc(n, v);
    async function write(offset: number, data: Buffer): Promise<void> {
      const fh = await fsp.open(vol, 'r+');
      await fh.write(data, 0, data.length, offset);
      await fh.sync();
      await fh.close();
    }

    it('FICLONE shares extents (FIEMAP says shared) and FIEMAP reports unwritten extents', async () => {
      const fh = await fsp.open(vol, 'w+');
      await fh.truncate(size);
      await fh.write(fill(CS * 4, 7), 0, CS * 4, 0);
      await fh.sync();
      const fh2 = await fsp.open(path.join(fs.mount, 'probe'), 'w+');
      await native().ficlone(fh2.fd, fh.fd);
      const m = await fiemap(fh2.fd, 0, size, true);
      expect(m.length).to.be.greaterThan(0);
      expect(m.every((x) => (x.flags & FiemapFlags.SHARED) !== 0)).to.equal(true);
      await native().zeroRange(fh2.fd, 100 * CS, CS); // XFS allocates an unwritten extent
      const m2 = await fiemap(fh2.fd, 0, size, true);
      expect(m2.some((x) => x.logical === 100 * CS && (x.flags & FiemapFlags.UNWRITTEN) !== 0)).to.equal(true);
      await fh2.close();
      await fh.close();
      await fsp.rm(path.join(fs.mount, 'probe'));
    });

    it('marks exactly the chunks written, punched or newly allocated; reads each generation from its snapshot', async () => {
      expect(await reflinkUsable(vol, state)).to.deep.equal({ ok: true });
      const src = new ReflinkSource(vol, size, CS, state);
      await src.open(0, 0);
      const g1 = await src.detect(1, { all: true });
      expect(g1.bitmap.size).to.equal(size / CS);
      expect(g1.readBytes).to.equal(0);
      await src.committed(1);

      await write(5 * CS + 4 * K, fill(4 * K, 1)); // inside chunk 5
      await write(20 * CS, fill(16 * CS, 2)); // chunks 20..35, new allocation
      const fh = await fsp.open(vol, 'r+');
      await native().punchHole(fh.fd, 2 * CS, CS); // chunk 2 punched
      await native().zeroRange(fh.fd, 60 * CS, CS); // chunk 60: unwritten, still zeros
      await fh.sync();
      await fh.close();

      const g2 = await src.detect(2);
      const expected = [2, 5, ...Array.from({ length: 16 }, (_, i) => 20 + i)];
      expect(g2.bitmap.toArray()).to.deep.equal(expected);
      expect(g2.readBytes).to.equal(0);

      // The application keeps writing: generation 2 still reads what it had at detect time.
      await write(20 * CS, fill(CS, 9));
      const view = await src.view(2);
      expect((await view.read(20 * CS, 4)).equals(fill(4, 2))).to.equal(true);
      expect((await view.read(5 * CS + 4 * K, 4)).equals(fill(4, 1))).to.equal(true);

      // Nothing more changed than the write just made: one chunk.
      await src.committed(2);
      const names = await fsp.readdir(state);
      expect(names.filter((n) => n.startsWith('snap-')).sort()).to.deep.equal(['snap-2.img']);
      const g3 = await src.detect(3);
      expect(g3.bitmap.toArray()).to.deep.equal([20]);
      await src.close();
    });

    it('after a restart keeps the committed and the pending snapshot, removes leftovers; no change found means no snapshot kept', async () => {
      // State as the last test left it: committed 2, snap-3 pending.
      await fsp.writeFile(path.join(state, 'snap-7.img.tmp'), 'torn');
      await fsp.writeFile(path.join(state, 'snap-1.img'), 'stale');
      const src = new ReflinkSource(vol, size, CS, state);
      await src.open(3, 2);
      expect((await fsp.readdir(state)).filter((n) => n.startsWith('snap-')).sort()).to.deep.equal(['snap-2.img', 'snap-3.img']);
      await src.committed(3);
      const again = await src.detect(4);
      expect(again.bitmap.isEmpty).to.equal(true);
      expect((await fsp.readdir(state)).filter((n) => n.startsWith('snap-'))).to.deep.equal(['snap-3.img']);
      await src.close();
    });

    it('a lost base is reported (baseLost), never taken as "nothing changed"', async () => {
      // A volume and state directory of its own: committed generation 1, then its snapshot goes.
      const own = await fsp.mkdtemp(path.join(fs.mount, 'lost-'));
      const ownVol = path.join(own, 'v.img');
      const fh = await fsp.open(ownVol, 'w+');
      await fh.truncate(size);
      await fh.write(fill(CS, 3), 0, CS, CS);
      await fh.close();
      const src = new ReflinkSource(ownVol, size, CS, own);
      await src.open(0, 0);
      await src.detect(1, { all: true });
      await src.committed(1);
      await fsp.rm(path.join(own, 'snap-1.img'));
      const d = await src.detect(2);
      expect(d.baseLost).to.equal(true);
      expect(d.bitmap.size).to.equal(size / CS);
      await src.close();
    });
  });

  it('reflinkUsable says why not when the state directory is on another filesystem than the volume', async function () {
    const fs = await LoopFs.create('xfs', 512 * 1024 * 1024);
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tm-rl-'));
    try {
      const vol = path.join(fs.mount, 'v.img');
      await (await fsp.open(vol, fsc.O_CREAT | fsc.O_WRONLY)).close();
      const r = await reflinkUsable(vol, dir);
      expect(r.ok).to.equal(false);
      expect(r.ok ? '' : r.reason).to.contain('not on the filesystem');
    } finally {
      await fs.cleanup();
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });
});
