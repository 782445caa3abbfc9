import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readSync, rmSync, statSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { TmError } from '../../src/errors.js';
import { native, type NativeOps } from '../../src/native/index.js';
import { toolEnv } from '../../src/track/thin-meta.js';
import { BlockDeviceVolume } from '../../src/volume/block-device.js';
import { needTools } from '../helpers/fake-lvm.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (e: unknown) => e,
  );
}

function unsupported(syscall: string): Promise<void> {
  const e = new Error(`${syscall}: Operation not supported`) as NodeJS.ErrnoException;
  e.code = 'EOPNOTSUPP';
  return Promise.reject(e);
}

describe('block-device volume (a real loop device)', () => {
  let dir: string;
  let backing: string;
  let loop: string | null = null;
  const volumes: BlockDeviceVolume[] = [];
  // 8 MiB + 1.5 KiB: a size that is no multiple of 4 KiB (loop devices round to 512 bytes).
  const SIZE = 8 * MiB + 1536;

  before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-blk-'))));
  after(() => rmSync(dir, { recursive: true, force: true }));

  beforeEach(() => {
    needTools('losetup');
    backing = path.join(dir, `backing-${Date.now()}-${Math.random().toString(16).slice(2)}.img`);
    const fd = openSync(backing, 'w');
    ftruncateSync(fd, SIZE);
    closeSync(fd);
    loop = execFileSync('losetup', ['--find', '--show', backing], { env: toolEnv(), encoding: 'utf8' }).trim();
  });

  afterEach(async () => {
    for (const v of volumes.splice(0)) await v.close().catch(() => {});
    if (loop) {
      const l = loop;
      loop = null;
      execFileSync('losetup', ['--detach', l], { env: toolEnv() });
    }
    rmSync(backing, { force: true });
  });

  async function open(o: Parameters<typeof BlockDeviceVolume.open>[1] = {}): Promise<BlockDeviceVolume> {
    const v = await BlockDeviceVolume.open(loop!, o);
    volumes.push(v);
    return v;
  }

  function readBacking(offset: number, length: number): Buffer {
    const b = Buffer.alloc(length);
    const fd = openSync(backing, 'r');
    try {
      readSync(fd, b, 0, length, offset);
    } finally {
      closeSync(fd);
    }
    return b;
  }

  it('size from BLKGETSIZE64; the whole device is allocated unless a map is given', async () => {
    const v = await open();
    expect(v.kind).to.equal('block');
    expect(v.size).to.equal(SIZE);
    expect(v.capabilities.allocationMap).to.equal(false);
    expect(await v.allocated()).to.deep.equal([{ offset: 0, length: SIZE }]);

    const m = await open({ readOnly: true, allocated: async () => [{ offset: 100 * KiB, length: 10 * KiB }, { offset: 8 * MiB, length: 1 * MiB }] });
    expect(m.capabilities.allocationMap).to.equal(true);
    // Clipped to the device; widened to the alignment.
    expect(await m.allocated()).to.deep.equal([{ offset: 100 * KiB, length: 10 * KiB }, { offset: 8 * MiB, length: 1536 }]);
    expect(await m.allocated(64 * KiB)).to.deep.equal([{ offset: 64 * KiB, length: 64 * KiB }, { offset: 8 * MiB, length: 1536 }]);
  });

  it('writes reach the backing file; reads see them; the tail past the last 4 KiB works', async () => {
    const v = await open();
    const data = Buffer.alloc(3 * KiB, 0x5a);
    await v.write(SIZE - data.length, data);
    await v.write(12345, Buffer.from('hello'));
    await v.flush();
    expect((await v.read(SIZE - data.length, data.length)).equals(data)).to.equal(true);
    expect((await v.read(12345, 5)).toString()).to.equal('hello');
    expect(readBacking(SIZE - data.length, data.length).equals(data)).to.equal(true);
    expect(readBacking(12345, 5).toString()).to.equal('hello');
  });

  it('zero(): unaligned edges written, the aligned middle unmapped through fallocate (the backing file gets a hole)', async () => {
    const v = await open();
    await v.write(0, Buffer.alloc(2 * MiB, 0xff));
    await v.flush();
    const before = statSync(backing).blocks * 512;
    await v.zero(1000, MiB + 5000);
    await v.flush();
    expect(v.capabilities.punchHole).to.equal(true); // the loop driver takes write-zeroes
    const got = await v.read(0, 2 * MiB);
    expect(got.subarray(0, 1000).every((b) => b === 0xff)).to.equal(true);
    expect(got.subarray(1000, 1000 + MiB + 5000).every((b) => b === 0)).to.equal(true);
    expect(got.subarray(1000 + MiB + 5000).every((b) => b === 0xff)).to.equal(true);
    const after = statSync(backing).blocks * 512;
    expect(before - after).to.be.at.least(MiB - 8 * KiB); // the 4 KiB-aligned middle was deallocated
    expect(readBacking(1000, 100).every((b) => b === 0)).to.equal(true);
  });

  it('zero() falls back to ZERO_RANGE, then to writing zeros, and remembers', async () => {
    const real = native();
    let zeroRangeCalls = 0;
    const noPunch: NativeOps = { ...real, punchHole: () => unsupported('fallocate(PUNCH_HOLE)') };
    const v = await open({ ops: noPunch });
    await v.write(0, Buffer.alloc(256 * KiB, 0xee));
    await v.zero(64 * KiB, 64 * KiB);
    expect(v.capabilities).to.include({ punchHole: false, zeroRange: true });
    expect((await v.read(64 * KiB, 64 * KiB)).every((b) => b === 0)).to.equal(true);

    const neither: NativeOps = {
      ...real,
      punchHole: () => unsupported('fallocate(PUNCH_HOLE)'),
      zeroRange: () => {
        zeroRangeCalls++;
        return unsupported('fallocate(ZERO_RANGE)');
      },
    };
    const w = await open({ ops: neither });
    await w.zero(128 * KiB, 64 * KiB);
    await w.zero(192 * KiB, 8 * KiB);
    expect(zeroRangeCalls).to.equal(1);
    expect(w.capabilities).to.include({ punchHole: false, zeroRange: false });
    const got = await w.read(0, 256 * KiB);
    expect(got.subarray(0, 64 * KiB).every((b) => b === 0xee)).to.equal(true);
    expect(got.subarray(64 * KiB, 200 * KiB).every((b) => b === 0)).to.equal(true);
    expect(got.subarray(200 * KiB).every((b) => b === 0xee)).to.equal(true);
  });

  it('read-only: writes and zeroing refused; out-of-range access is TM_ERR_VOLUME_RANGE; a regular file is not a block device', async () => {
    const r = await open({ readOnly: true });
    expect(await rejection(r.write(0, Buffer.alloc(1)))).to.be.instanceOf(TmError).with.property('code', 'TM_ERR_VOLUME_IO');
    expect(await rejection(r.zero(0, 4096))).to.be.instanceOf(TmError).with.property('code', 'TM_ERR_VOLUME_IO');
    expect(await rejection(r.read(SIZE - 10, 11))).to.be.instanceOf(TmError).with.property('code', 'TM_ERR_VOLUME_RANGE');
    const e = await rejection(BlockDeviceVolume.open(backing));
    expect(e).to.be.instanceOf(TmError).with.property('code', 'TM_ERR_VOLUME_IO');
    expect((e as TmError).message).to.include('is not a block device');
    await r.close();
    expect(await rejection(r.read(0, 1))).to.be.instanceOf(TmError);
  });
});
