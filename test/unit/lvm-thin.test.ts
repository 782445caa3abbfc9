import { expect } from 'chai';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { TmError } from '../../src/errors.js';
import type { RoaringBitmap32 } from '../../src/track/bitmap-store.js';
import { LvmThinSource, type AllocationMapProvider } from '../../src/track/lvm-thin.js';
import { SparseFileVolume } from '../../src/volume/sparse-file.js';
import { alignRanges, type ByteRange, type Volume } from '../../src/volume/volume.js';
import { FakeLvm, needTools, SimulatedCrash } from '../helpers/fake-lvm.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const VG = 'vg0';
const POOL = 'pool0';
const LV = 'vol';

function bits(b: RoaringBitmap32): number[] {
  return Array.from(b.toArray());
}

function range(from: number, to: number): number[] {
  return Array.from({ length: to - from }, (_, i) => from + i);
}

/**
 * The view a test gets for a "snapshot device" of the FakeLvm test double: the
 * snapshot's sparse file (read-only) whose allocated() is the map LvmThinSource
 * computes from the pool metadata (thin_dump), as BlockDeviceVolume does on a
 * real device.
 */
class FakeSnapshotView implements Volume {
  readonly kind = 'block' as const;
  readonly capabilities = { allocationMap: true, punchHole: false, zeroRange: false };
  private constructor(
    private readonly inner: SparseFileVolume,
    private readonly map: AllocationMapProvider,
  ) {}
  static async open(file: string, map: AllocationMapProvider): Promise<FakeSnapshotView> {
    return new FakeSnapshotView(await SparseFileVolume.open(file, { readOnly: true }), map);
  }
  get path(): string {
    return this.inner.path;
  }
  get size(): number {
    return this.inner.size;
  }
  async allocated(alignTo?: number): Promise<ByteRange[]> {
    const r = await this.map();
    return alignTo ? alignRanges(r, alignTo, this.size) : r;
  }
  read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    return this.inner.read(offset, length, into);
  }
  async write(): Promise<void> {
    throw new Error('snapshot views are read-only');
  }
  async zero(): Promise<void> {
    throw new Error('snapshot views are read-only');
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (e: unknown) => e,
  );
}

describe('LvmThinSource against a test double of LVM (FakeLvm: real thin_restore metadata files, no device-mapper)', () => {
  let root: string;
  let n = 0;
  before(() => (root = mkdtempSync(path.join(os.tmpdir(), 'tm-lvmthin-'))));
  after(() => rmSync(root, { recursive: true, force: true }));

  /** A fresh pool (FakeLvm) and a state dir; `source()` makes a new LvmThinSource instance on them (a restarted daemon). */
  function setup(o: { dataBlockSize: number; chunkSize: number; volumeSize: number }) {
    needTools('thin_restore', 'thin_dump', 'thin_delta');
    const dir = path.join(root, `case${n++}`);
    const stateDir = path.join(dir, 'state');
    const lvmDir = path.join(dir, 'lvm');
    mkdirSync(stateDir, { recursive: true });
    mkdirSync(lvmDir, { recursive: true });
    const fake = new FakeLvm(lvmDir, VG, POOL, LV, o.dataBlockSize, o.volumeSize);
    const sources: LvmThinSource[] = [];
    const source = () => {
      const s = new LvmThinSource({
        vg: VG,
        lv: LV,
        pool: POOL,
        chunkSize: o.chunkSize,
        volumeSize: o.volumeSize,
        stateDir,
        lvm: fake,
        openView: (dev, map) => FakeSnapshotView.open(dev, map),
      });
      sources.push(s);
      return s;
    };
    const cleanup = async () => {
      for (const s of sources) await s.close().catch(() => {});
    };
    return { fake, source, stateDir, cleanup };
  }

  describe('thin block 64 KiB, chunk 256 KiB, 4 MiB volume (16 chunks)', () => {
    const geometry = { dataBlockSize: 64 * KiB, chunkSize: 256 * KiB, volumeSize: 4 * MiB };
    let ctx: ReturnType<typeof setup>;
    afterEach(async () => ctx && (await ctx.cleanup()));

    it('each detect takes a snapshot; thin_delta between N-1 and N gives exactly the written or discarded chunks; views read frozen data', async () => {
      ctx = setup(geometry);
      const { fake, source } = ctx;
      const s = source();
      await s.open(0, 0);
      const d1 = await s.detect(1, { all: true });
      expect(bits(d1.bitmap)).to.deep.equal(range(0, 16));
      expect(d1.baseLost).to.equal(undefined);
      expect(fake.snapshotNames()).to.deep.equal(['vol_tm_gen1']);
      expect(fake.calls.filter((c) => c.startsWith('reserve'))).to.deep.equal([]); // nothing to compare: no metadata read

      fake.write(0, Buffer.alloc(64 * KiB, 0x11)); // chunk 0
      fake.write(5 * 256 * KiB + 10, Buffer.alloc(100, 0x22)); // chunk 5
      const d2 = await s.detect(2);
      expect(bits(d2.bitmap)).to.deep.equal([0, 5]);
      expect(d2.readBytes).to.equal(0);
      expect(d2.baseLost).to.equal(undefined);
      expect(await fake.heldMetadataRoot()).to.equal(null); // released after the delta
      expect(fake.calls.slice(-2)).to.deep.equal([`reserveMetadataSnap ${VG}/${POOL}`, `releaseMetadataSnap ${VG}/${POOL}`]);

      // Written after snapshot 2: view 2 keeps what it froze.
      fake.write(0, Buffer.alloc(64 * KiB, 0x33));
      const v2 = await s.view(2);
      expect(v2).to.equal(await s.view(2)); // cached
      expect((await v2.read(0, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0x11))).to.equal(true);
      expect((await (await s.view(1)).read(0, 64 * KiB)).equals(Buffer.alloc(64 * KiB))).to.equal(true);
      // The allocation map of a view comes from thin_dump -m of its snapshot.
      expect(await v2.allocated()).to.deep.equal([
        { offset: 0, length: 64 * KiB },
        { offset: 5 * 256 * KiB, length: 64 * KiB },
      ]);
      expect(await v2.allocated(256 * KiB)).to.deep.equal([
        { offset: 0, length: 256 * KiB },
        { offset: 5 * 256 * KiB, length: 256 * KiB },
      ]);

      fake.discard(20, 1); // thin block 20 = chunk 5
      fake.write(9 * 256 * KiB + 200 * KiB, Buffer.alloc(100 * KiB, 0x44)); // blocks 39-40 = chunks 9 and 10
      const d3 = await s.detect(3);
      expect(bits(d3.bitmap)).to.deep.equal([0, 5, 9, 10]);

      await s.committed(2);
      expect(fake.snapshotNames()).to.deep.equal(['vol_tm_gen2', 'vol_tm_gen3']);
      await s.committed(3);
      expect(fake.snapshotNames()).to.deep.equal(['vol_tm_gen3']);
      const e = await rejection(s.view(2));
      expect(e).to.be.instanceOf(TmError).with.property('code', 'TM_ERR_LVM');

      // Nothing written: an empty delta, and the snapshot is still taken.
      const d4 = await s.detect(4);
      expect(bits(d4.bitmap)).to.deep.equal([]);
      expect(fake.snapshotNames()).to.deep.equal(['vol_tm_gen3', 'vol_tm_gen4']);
      const state = JSON.parse(readFileSync(path.join(ctx.stateDir, 'lvm-thin.json'), 'utf8')) as { snapshots: number[]; metadataSnapReserved: boolean };
      expect(state).to.include({ metadataSnapReserved: false });
      expect(state.snapshots).to.deep.equal([3, 4]);
    });

    /** Generations 1 (all) and 2 (chunk 1 written) detected; 1 committed. */
    async function twoGenerations(c: ReturnType<typeof setup>): Promise<LvmThinSource> {
      const s = c.source();
      await s.open(0, 0);
      await s.detect(1, { all: true });
      c.fake.write(256 * KiB, Buffer.alloc(10, 1));
      expect(bits((await s.detect(2)).bitmap)).to.deep.equal([1]);
      await s.committed(1);
      return s;
    }

    it('killed after taking snapshot N, before the delta: the restarted source takes N again and loses no write', async () => {
      ctx = setup(geometry);
      const { fake, source } = ctx;
      const s = await twoGenerations(ctx);
      fake.write(3 * 256 * KiB, Buffer.alloc(10, 3));
      fake.crashAt = { method: 'reserveMetadataSnap' };
      expect(await rejection(s.detect(3))).to.be.instanceOf(SimulatedCrash);
      expect(fake.snapshotNames()).to.include('vol_tm_gen3');
      fake.write(7 * 256 * KiB, Buffer.alloc(10, 7)); // after the stale snapshot 3

      const s2 = source(); // the restarted daemon: generation 2 recorded, 1 committed
      await s2.open(2, 1);
      expect(fake.snapshotNames()).to.deep.equal(['vol_tm_gen1', 'vol_tm_gen2']); // the unrecorded 3 is gone
      expect(bits((await s2.detect(3)).bitmap)).to.deep.equal([3, 7]);
    });

    it('killed half way through lvcreate (snapshot exists, never recorded): detect(N) replaces it', async () => {
      ctx = setup(geometry);
      const { fake, source } = ctx;
      const s = await twoGenerations(ctx);
      fake.write(4 * 256 * KiB, Buffer.alloc(10, 4));
      fake.crashAt = { method: 'createThinSnapshot', after: true };
      expect(await rejection(s.detect(3))).to.be.instanceOf(SimulatedCrash);
      fake.write(8 * 256 * KiB, Buffer.alloc(10, 8));
      const s2 = source();
      await s2.open(2, 1);
      const d = await s2.detect(3);
      expect(bits(d.bitmap)).to.deep.equal([4, 8]);
      expect((await (await s2.view(3)).read(8 * 256 * KiB, 10)).equals(Buffer.alloc(10, 8))).to.equal(true);
    });

    it('killed between reserve_metadata_snap and release_metadata_snap: the next open releases it, the next detect loses nothing', async () => {
      ctx = setup(geometry);
      const { fake, source, stateDir } = ctx;
      const s = await twoGenerations(ctx);
      fake.write(2 * 256 * KiB, Buffer.alloc(10, 2));
      fake.crashAt = { method: 'releaseMetadataSnap' };
      expect(await rejection(s.detect(3))).to.be.instanceOf(SimulatedCrash);
      expect(await fake.heldMetadataRoot()).to.be.a('number'); // left held, as a killed process leaves it
      const state = JSON.parse(readFileSync(path.join(stateDir, 'lvm-thin.json'), 'utf8')) as { metadataSnapReserved: boolean };
      expect(state.metadataSnapReserved).to.equal(true);
      fake.write(6 * 256 * KiB, Buffer.alloc(10, 6));

      const s2 = source();
      await s2.open(2, 1);
      expect(await fake.heldMetadataRoot()).to.equal(null);
      expect(bits((await s2.detect(3)).bitmap)).to.deep.equal([2, 6]);
      expect(await fake.heldMetadataRoot()).to.equal(null);
    });

    it('release_metadata_snap failed (no restart): the same instance releases the leftover at its next detect', async () => {
      ctx = setup(geometry);
      const { fake } = ctx;
      const s = await twoGenerations(ctx);
      fake.write(2 * 256 * KiB, Buffer.alloc(10, 2));
      fake.crashAt = { method: 'releaseMetadataSnap' };
      expect(await rejection(s.detect(3))).to.be.instanceOf(SimulatedCrash);
      expect(await fake.heldMetadataRoot()).to.be.a('number');
      fake.write(9 * 256 * KiB, Buffer.alloc(10, 9));
      expect(bits((await s.detect(3)).bitmap)).to.deep.equal([2, 9]);
      expect(await fake.heldMetadataRoot()).to.equal(null);
    });

    it('killed after reserve_metadata_snap, before thin_delta: the restarted source releases it and loses nothing', async () => {
      ctx = setup(geometry);
      const { fake, source } = ctx;
      const s = await twoGenerations(ctx);
      fake.write(2 * 256 * KiB, Buffer.alloc(10, 2));
      fake.crashAt = { method: 'reserveMetadataSnap', after: true };
      expect(await rejection(s.detect(3))).to.be.instanceOf(SimulatedCrash);
      expect(await fake.heldMetadataRoot()).to.be.a('number');
      fake.write(9 * 256 * KiB, Buffer.alloc(10, 9));
      const s2 = source();
      await s2.open(2, 1);
      expect(await fake.heldMetadataRoot()).to.equal(null);
      expect(bits((await s2.detect(3)).bitmap)).to.deep.equal([2, 9]);
    });

    it('a metadata snapshot held by another tool is refused with what to do, never silently released; after its release detect works', async () => {
      ctx = setup(geometry);
      const { fake } = ctx;
      const s = await twoGenerations(ctx);
      fake.write(5 * 256 * KiB, Buffer.alloc(10, 5));
      await fake.reserveMetadataSnap(VG, POOL); // somebody else (thin_ls -m, a backup tool)
      const e = await rejection(s.detect(3));
      expect(e).to.be.instanceOf(TmError).with.property('code', 'TM_ERR_LVM');
      expect((e as TmError).message).to.include(`dmsetup message ${VG}-${POOL}-tpool 0 release_metadata_snap`);
      expect(await fake.heldMetadataRoot()).to.be.a('number');
      await fake.releaseMetadataSnap(VG, POOL);
      expect(bits((await s.detect(3)).bitmap)).to.deep.equal([5]);
    });

    it('killed in committed() between two lvremoves: the restarted source removes what is below the committed generation', async () => {
      ctx = setup(geometry);
      const { fake, source } = ctx;
      const s = await twoGenerations(ctx);
      await s.detect(3);
      await s.detect(4);
      fake.crashAt = { method: 'removeLv', after: true };
      expect(await rejection(s.committed(4))).to.be.instanceOf(SimulatedCrash);
      // gen1 went (committed(1) kept it as the base), the kill came before gen2 and gen3.
      expect(fake.snapshotNames()).to.deep.equal(['vol_tm_gen2', 'vol_tm_gen3', 'vol_tm_gen4']);
      const s2 = source();
      await s2.open(4, 4);
      expect(fake.snapshotNames()).to.deep.equal(['vol_tm_gen4']);
      fake.write(15 * 256 * KiB, Buffer.alloc(10, 1));
      expect(bits((await s2.detect(5)).bitmap)).to.deep.equal([15]);
    });

    it('state file lost: open keeps the snapshots of [committed, generation] it finds in the VG, removes the others', async () => {
      ctx = setup(geometry);
      const { fake, source, stateDir } = ctx;
      const s = await twoGenerations(ctx);
      await s.detect(3);
      await s.close();
      await fake.createThinSnapshot(VG, LV, 'vol_tm_gen7'); // a leftover of an unrecorded detection
      await fake.createThinSnapshot(VG, LV, 'vol_tm_gen0');
      await fake.createThinSnapshot(VG, LV, 'vol_tm_genx'); // not ours: left alone
      rmSync(path.join(stateDir, 'lvm-thin.json'));
      fake.write(11 * 256 * KiB, Buffer.alloc(10, 1));
      const s2 = source();
      await s2.open(3, 2);
      expect(fake.snapshotNames()).to.deep.equal(['vol_tm_gen2', 'vol_tm_gen3', 'vol_tm_genx']);
      expect(bits((await s2.detect(4)).bitmap)).to.deep.equal([11]);
    });

    it('a base snapshot removed by hand: every chunk, flagged baseLost (never "nothing changed")', async () => {
      ctx = setup(geometry);
      const { fake, source } = ctx;
      const s = await twoGenerations(ctx);
      await s.close();
      await fake.removeLv(VG, 'vol_tm_gen2');
      const s2 = source();
      await s2.open(2, 1);
      const d = await s2.detect(3);
      expect(bits(d.bitmap)).to.deep.equal(range(0, 16));
      expect(d.baseLost).to.equal(true);
      expect(fake.snapshotNames()).to.include('vol_tm_gen3');
      expect(bits((await s2.detect(4)).bitmap)).to.deep.equal([]); // and from there on, deltas again
    });

    it('reset(): the next detection is full (again if it is retried), the ones after are deltas', async () => {
      ctx = setup(geometry);
      const { fake, source } = ctx;
      const s = await twoGenerations(ctx);
      await s.reset();
      expect(bits((await s.detect(3)).bitmap)).to.deep.equal(range(0, 16));
      const s2 = source(); // restart before 3 was recorded: still full
      await s2.open(2, 1);
      expect(bits((await s2.detect(3)).bitmap)).to.deep.equal(range(0, 16));
      fake.write(12 * 256 * KiB, Buffer.alloc(10, 1));
      expect(bits((await s2.detect(4)).bitmap)).to.deep.equal([12]);
    });

    it('detect(N) called again replaces the view of N (closing the old one)', async () => {
      ctx = setup(geometry);
      const { fake } = ctx;
      const s = await twoGenerations(ctx);
      fake.write(0, Buffer.alloc(10, 0xaa));
      await s.detect(3);
      const v = await s.view(3);
      fake.write(0, Buffer.alloc(10, 0xbb));
      expect(bits((await s.detect(3)).bitmap)).to.deep.equal([0]);
      const v2 = await s.view(3);
      expect(v2).to.not.equal(v);
      expect((await v2.read(0, 10)).equals(Buffer.alloc(10, 0xbb))).to.equal(true);
      expect(await rejection(v.read(0, 10))).to.be.instanceOf(TmError); // closed
    });

    it('a state file of another volume is refused', async () => {
      ctx = setup(geometry);
      const { stateDir } = ctx;
      const s = ctx.source();
      await s.open(0, 0);
      const other = new LvmThinSource({
        vg: VG,
        lv: 'other',
        pool: POOL,
        chunkSize: 256 * KiB,
        volumeSize: 4 * MiB,
        stateDir,
        lvm: ctx.fake,
        openView: (dev, map) => FakeSnapshotView.open(dev, map),
      });
      const e = await rejection(other.open(0, 0));
      expect(e).to.be.instanceOf(TmError).with.property('code', 'TM_ERR_STATE');
    });
  });

  it('thin block 512 KiB, chunk 64 KiB, 3.5 MiB volume: one written byte marks the eight chunks of its thin block', async () => {
    const c = setup({ dataBlockSize: 512 * KiB, chunkSize: 64 * KiB, volumeSize: 3.5 * MiB });
    try {
      const s = c.source();
      await s.open(0, 0);
      expect(bits((await s.detect(1, { all: true })).bitmap)).to.deep.equal(range(0, 56));
      c.fake.write(3 * 512 * KiB + 5, Buffer.alloc(1, 1)); // thin block 3 → chunks 24-31
      c.fake.write(6 * 512 * KiB + 100 * KiB, Buffer.alloc(1, 1)); // the last thin block → chunks 48-55
      expect(bits((await s.detect(2)).bitmap)).to.deep.equal([...range(24, 32), ...range(48, 56)]);
      c.fake.discard(3, 1);
      expect(bits((await s.detect(3)).bitmap)).to.deep.equal(range(24, 32));
      expect(existsSync(c.fake.metaFile)).to.equal(true);
    } finally {
      await c.cleanup();
    }
  });
});
