import { expect } from 'chai';
import { closeSync, ftruncateSync, mkdtempSync, openSync, rmSync, statSync, writeSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { native, type NativeOps } from '../../src/native/index.js';
import { describeMap, formatMap } from '../../src/volume/map.js';
import { SparseFileVolume } from '../../src/volume/sparse-file.js';
import { alignRanges, allocatedBytesOf, mergeRanges } from '../../src/volume/volume.js';
import { isAllZero } from '../../src/volume/zero.js';

const KiB = 1024;
const MiB = 1024 * KiB;

describe('native addon and the sparse-file volume (real files)', () => {
  let dir: string;
  let n = 0;
  const file = () => path.join(dir, `v${n++}.img`);
  before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-vol-'))));
  after(() => rmSync(dir, { recursive: true, force: true }));

  /** A sparse file of `size` bytes with data written at the given offsets. */
  function sparse(size: number, writes: [number, number][]): string {
    const f = file();
    const fd = openSync(f, 'w');
    for (const [off, len] of writes) writeSync(fd, Buffer.alloc(len, 0xab), 0, len, off);
    closeSync(fd);
    // Extend to size without allocating.
    const fd2 = openSync(f, 'r+');
    ftruncateSync(fd2, size);
    closeSync(fd2);
    return f;
  }

  it('seekData/seekHole find data and holes; -1 past the data', () => {
    const f = sparse(8 * MiB, [[2 * MiB, 64 * KiB]]);
    const fd = openSync(f, 'r');
    try {
      const ops = native();
      expect(ops.seekData(fd, 0)).to.equal(2 * MiB);
      expect(ops.seekHole(fd, 2 * MiB)).to.equal(2 * MiB + 64 * KiB);
      expect(ops.seekData(fd, 3 * MiB)).to.equal(-1);
    } finally {
      closeSync(fd);
    }
  });

  it('native errors carry code, errno and syscall; bad arguments are TypeErrors', async () => {
    const ops = native();
    expect(() => ops.seekData(99999, 0)).to.throw().that.includes({ code: 'EBADF', syscall: 'lseek(SEEK_DATA)' });
    const f = sparse(1 * MiB, []);
    const fd = openSync(f, 'r');
    try {
      expect(() => ops.blkGetSize64(fd)).to.throw().that.includes({ code: 'ENOTTY' });
      const err = await ops.punchHole(fd, 0, 4096).catch((e: NodeJS.ErrnoException) => e);
      expect(err).to.include({ code: 'EBADF', syscall: 'fallocate(PUNCH_HOLE)' }); // opened read-only
      expect((err as NodeJS.ErrnoException).errno).to.be.a('number');
    } finally {
      closeSync(fd);
    }
    expect(() => (ops.seekData as (a: unknown, b: unknown) => number)('x', 0)).to.throw(TypeError);
    expect(() => ops.seekData(1, -5)).to.throw(TypeError);
  });

  it('allocation map: merged extents, aligned to the chunk, tail clipped to the size', async () => {
    const size = 10 * MiB + 1000;
    const f = sparse(size, [
      [1 * MiB, 4 * KiB],
      [1 * MiB + 4 * KiB, 4 * KiB], // touches the previous one
      [5 * MiB + 100 * KiB, 8 * KiB],
      [10 * MiB, 1000], // the partial tail
    ]);
    const v = await SparseFileVolume.open(f, { readOnly: true });
    try {
      expect(v.size).to.equal(size);
      expect(v.kind).to.equal('file');
      expect(await v.allocated()).to.deep.equal([
        { offset: 1 * MiB, length: 8 * KiB },
        { offset: 5 * MiB + 100 * KiB, length: 8 * KiB },
        { offset: 10 * MiB, length: 1000 },
      ]);
      expect(await v.allocated(64 * KiB)).to.deep.equal([
        { offset: 1 * MiB, length: 64 * KiB },
        { offset: 5 * MiB + 64 * KiB, length: 64 * KiB },
        { offset: 10 * MiB, length: 1000 },
      ]);
      // Counted without building the list: the same bytes as the map's.
      expect(await v.allocatedBytes()).to.equal(16 * KiB + 1000);
      expect(await allocatedBytesOf(v)).to.equal(16 * KiB + 1000);
    } finally {
      await v.close();
    }
    const m = await describeMap(f, 64 * KiB);
    expect(m.allocatedBytes).to.equal(128 * KiB + 1000);
    expect(formatMap(m)).to.contain('3 extents').and.contain(`${128 * KiB + 1000} of ${size} bytes`);
  });

  it('read/write/zero round trip; zero punches a real hole (block count drops)', async () => {
    const f = file();
    const v = await SparseFileVolume.open(f, { create: { size: 4 * MiB } });
    try {
      expect(statSync(f).size).to.equal(4 * MiB);
      expect(statSync(f).blocks).to.equal(0);
      await v.write(1 * MiB, Buffer.alloc(1 * MiB, 7));
      await v.flush();
      expect(statSync(f).blocks * 512).to.be.at.least(1 * MiB);
      expect((await v.read(1 * MiB + 5, 3)).equals(Buffer.from([7, 7, 7]))).to.equal(true);
      await v.zero(1 * MiB, 512 * KiB);
      expect(statSync(f).blocks * 512).to.equal(512 * KiB);
      expect(isAllZero(await v.read(1 * MiB, 512 * KiB))).to.equal(true);
      expect(v.capabilities.punchHole).to.equal(true);
    } finally {
      await v.close();
    }
  });

  it('range errors are TM_ERR_VOLUME_RANGE; a missing file is TM_ERR_VOLUME_IO naming it', async () => {
    const f = file();
    const v = await SparseFileVolume.open(f, { create: { size: 1 * MiB } });
    try {
      for (const p of [v.read(1 * MiB - 10, 20), v.write(-1, Buffer.alloc(1)), v.zero(0, 2 * MiB)]) {
        const e = await p.then(() => null, (x: unknown) => x);
        expect(e).to.have.property('code', 'TM_ERR_VOLUME_RANGE');
      }
    } finally {
      await v.close();
    }
    const missing = path.join(dir, 'nope.img');
    const e = await SparseFileVolume.open(missing).then(() => null, (x: unknown) => x);
    expect(e).to.have.property('code', 'TM_ERR_VOLUME_IO');
    expect((e as Error).message).to.contain(missing);
  });

  it('zero falls back punch -> zero range -> write zeros and remembers (injected failing ops: test double)', async () => {
    const real = native();
    const calls: string[] = [];
    const unsupported = (name: string) => async () => {
      calls.push(name);
      throw Object.assign(new Error(`${name} failed: Operation not supported`), { code: 'EOPNOTSUPP' });
    };
    const ops: NativeOps = { ...real, punchHole: unsupported('punch'), zeroRange: unsupported('zero') };
    const f = file();
    const v = await SparseFileVolume.open(f, { create: { size: 2 * MiB }, ops });
    try {
      await v.write(0, Buffer.alloc(2 * MiB, 1));
      await v.zero(0, 1 * MiB + 4096);
      expect(calls).to.deep.equal(['punch', 'zero']);
      expect(v.capabilities).to.include({ punchHole: false, zeroRange: false });
      expect(isAllZero(await v.read(0, 1 * MiB + 4096))).to.equal(true);
      expect((await v.read(1 * MiB + 4096, 1))[0]).to.equal(1);
      await v.zero(0, 4096);
      expect(calls).to.deep.equal(['punch', 'zero']); // not tried again
    } finally {
      await v.close();
    }
  });

  it('a real I/O error from fallocate is not mistaken for "unsupported" (test double)', async () => {
    const ops: NativeOps = {
      ...native(),
      punchHole: async () => {
        throw Object.assign(new Error('fallocate(PUNCH_HOLE) failed: No space left on device'), { code: 'ENOSPC' });
      },
    };
    const v = await SparseFileVolume.open(file(), { create: { size: 1 * MiB }, ops });
    try {
      const e = await v.zero(0, 4096).then(() => null, (x: unknown) => x);
      expect(e).to.have.property('code', 'TM_ERR_NO_SPACE');
      expect(v.capabilities.punchHole).to.equal(true);
    } finally {
      await v.close();
    }
  });

  it('isAllZero and range helpers', () => {
    expect(isAllZero(Buffer.alloc(200 * KiB))).to.equal(true);
    const b = Buffer.alloc(200 * KiB);
    b[150 * KiB] = 1;
    expect(isAllZero(b)).to.equal(false);
    expect(isAllZero(Buffer.alloc(0))).to.equal(true);
    expect(mergeRanges([{ offset: 0, length: 10 }, { offset: 10, length: 5 }, { offset: 20, length: 1 }])).to.deep.equal([
      { offset: 0, length: 15 },
      { offset: 20, length: 1 },
    ]);
    expect(alignRanges([{ offset: 5, length: 10 }, { offset: 30, length: 1 }], 16, 40)).to.deep.equal([{ offset: 0, length: 32 }]);
    expect(alignRanges([{ offset: 33, length: 2 }], 16, 40)).to.deep.equal([{ offset: 32, length: 8 }]); // clipped to the size
  });
});
