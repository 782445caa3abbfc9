import { expect } from 'chai';
import { MEMORY_BLOCK, MemoryVolume, sameContent } from '../../src/volume/memory.js';
import { isAllZero } from '../../src/volume/zero.js';

const KiB = 1024;
const B = MEMORY_BLOCK;

/** The rejection of `p` (null if it resolved). */
async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => null,
    (e: unknown) => e,
  );
}

describe('memory volume: 4 KiB blocks in a Map, holes where nothing was written', () => {
  const names: string[] = [];
  afterEach(() => {
    for (const n of names.splice(0)) MemoryVolume.unregister(n);
  });

  it('a new volume is all holes and reads zeros; kind, path and capabilities', async () => {
    const v = MemoryVolume.create(1 * 1024 * KiB + 100, { path: 'memory:t' });
    expect(v.kind).to.equal('memory');
    expect(v.path).to.equal('memory:t');
    expect(v.size).to.equal(1024 * KiB + 100);
    expect(v.capabilities).to.deep.equal({ allocationMap: true, punchHole: true, zeroRange: true });
    expect(await v.allocated()).to.deep.equal([]);
    expect(isAllZero(await v.read(0, v.size))).to.equal(true);
    expect(MemoryVolume.create(0).size).to.equal(0);
    expect(() => MemoryVolume.create(-1)).to.throw().with.property('code', 'TM_ERR_VOLUME_RANGE');
  });

  it('a partial write allocates its whole block; writes across blocks round-trip', async () => {
    const v = MemoryVolume.create(64 * KiB);
    await v.write(B + 10, Buffer.from('hello'));
    expect(await v.allocated()).to.deep.equal([{ offset: B, length: B }]);
    expect((await v.read(B + 8, 9)).equals(Buffer.from([0, 0, 104, 101, 108, 108, 111, 0, 0]))).to.equal(true);
    // [3B - 1, 5B + 1) touches blocks 2, 3, 4 and 5; with block 1, one range [B, 6B).
    const data = Buffer.alloc(2 * B + 2);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
    await v.write(3 * B - 1, data);
    expect((await v.read(3 * B - 1, data.length)).equals(data)).to.equal(true);
    expect(await v.allocated()).to.deep.equal([{ offset: B, length: 5 * B }]);
    await v.write(10 * B, Buffer.alloc(0)); // an empty write allocates nothing
    expect(await v.allocated()).to.deep.equal([{ offset: B, length: 5 * B }]);
    // The write kept a copy: changing the caller's buffer changes nothing.
    data.fill(0xee);
    expect((await v.read(3 * B - 1, 1))[0]).to.equal(3);
  });

  it('zero() deallocates the blocks it covers whole and zero-fills the partial edges (they stay allocated)', async () => {
    const v = MemoryVolume.create(16 * B);
    await v.write(0, Buffer.alloc(8 * B, 0x5a));
    await v.zero(B + 100, 4 * B); // [B+100, 5B+100): blocks 2..4 whole, 1 and 5 partial
    expect(await v.allocated()).to.deep.equal([
      { offset: 0, length: 2 * B },
      { offset: 5 * B, length: 3 * B },
    ]);
    const got = await v.read(0, 8 * B);
    expect(got[B + 99]).to.equal(0x5a);
    expect(isAllZero(got.subarray(B + 100, 5 * B + 100))).to.equal(true);
    expect(got[5 * B + 100]).to.equal(0x5a);
    // Zeroing a hole allocates nothing; a partial zero inside a hole stays a hole.
    await v.zero(10 * B + 1, 10);
    expect(await v.allocated()).to.have.length(2);
  });

  it('a size that is not a multiple of the block: the tail block is clipped, and zeroing it keeps it allocated as ext4 does', async () => {
    const v = MemoryVolume.create(3 * B + 100);
    await v.write(3 * B + 50, Buffer.from([1, 2, 3]));
    expect(await v.allocated()).to.deep.equal([{ offset: 3 * B, length: 100 }]);
    expect(await v.allocated(64 * KiB)).to.deep.equal([{ offset: 0, length: 3 * B + 100 }]); // widened, clipped to size
    await v.write(B, Buffer.alloc(2 * B, 1));
    await v.zero(B, 2 * B + 100); // two whole blocks and the short tail
    expect(await v.allocated()).to.deep.equal([{ offset: 3 * B, length: 100 }]);
    expect(isAllZero(await v.read(0, v.size))).to.equal(true);
  });

  it('allocated(alignTo) widens to multiples, merges and clips like the sparse-file volume', async () => {
    const v = MemoryVolume.create(40 * B);
    await v.write(5 * B, Buffer.alloc(1, 1)); // block 5
    await v.write(6 * B, Buffer.alloc(1, 1)); // block 6: merged with 5
    await v.write(17 * B, Buffer.alloc(1, 1));
    await v.write(39 * B + 4000, Buffer.alloc(1, 1));
    expect(await v.allocated()).to.deep.equal([
      { offset: 5 * B, length: 2 * B },
      { offset: 17 * B, length: B },
      { offset: 39 * B, length: B },
    ]);
    expect(await v.allocated(8 * B)).to.deep.equal([
      { offset: 0, length: 8 * B },
      { offset: 16 * B, length: 8 * B },
      { offset: 32 * B, length: 8 * B },
    ]);
    expect(await v.allocated(16 * B)).to.deep.equal([{ offset: 0, length: 40 * B }]);
  });

  it('read(…, into) reads into the given buffer when it is big enough, else into a new one', async () => {
    const v = MemoryVolume.create(4 * B);
    await v.write(0, Buffer.from('abcdef'));
    const into = Buffer.alloc(10, 0xff);
    const got = await v.read(1, 3, into);
    expect(got.buffer).to.equal(into.buffer);
    expect(got.toString()).to.equal('bcd');
    expect(into.subarray(0, 3).toString()).to.equal('bcd');
    expect(into[3]).to.equal(0xff); // only `length` bytes written
    const small = Buffer.alloc(2);
    const other = await v.read(0, 6, small);
    expect(other.toString()).to.equal('abcdef');
    expect(small.equals(Buffer.alloc(2))).to.equal(true);
  });

  it('range errors are TM_ERR_VOLUME_RANGE; closed and read-only refusals are TM_ERR_VOLUME_IO', async () => {
    const v = MemoryVolume.create(1024 * KiB, { path: 'memory:r' });
    for (const p of [v.read(1024 * KiB - 10, 20), v.write(-1, Buffer.alloc(1)), v.zero(0, 2048 * KiB), v.read(0.5, 1), v.read(0, -1)]) {
      expect(await rejection(p)).to.have.property('code', 'TM_ERR_VOLUME_RANGE');
    }
    const ro = v.handle({ readOnly: true });
    expect(ro.capabilities).to.include({ punchHole: false, zeroRange: false });
    for (const p of [ro.write(0, Buffer.alloc(1)), ro.zero(0, 1)]) {
      const e = await rejection(p);
      expect(e).to.have.property('code', 'TM_ERR_VOLUME_IO');
      expect((e as Error).message).to.contain('read-only');
    }
    expect((await ro.read(0, 4)).length).to.equal(4);
    await v.close();
    await v.close(); // idempotent
    const e = await rejection(v.read(0, 1));
    expect(e).to.have.property('code', 'TM_ERR_VOLUME_IO');
    expect((e as Error).message).to.contain('memory:r').and.contain('closed');
    expect(await rejection(v.allocated())).to.have.property('code', 'TM_ERR_VOLUME_IO');
    expect(await rejection(ro.read(0, 1))).to.equal(null); // another handle is still open
  });

  it('flush counts calls on open handles of the same data; a closed handle ignores it', async () => {
    const v = MemoryVolume.create(B);
    const h = v.handle();
    await v.flush();
    await h.flush();
    await h.close();
    await h.flush();
    expect(v.flushes).to.equal(2);
    expect(h.flushes).to.equal(2);
  });

  it('registry: handles on a registered volume share its data, each with its own flags', async () => {
    const name = `reg-${process.pid}`;
    names.push(name);
    const mine = MemoryVolume.create(8 * B, { path: `memory:${name}` });
    MemoryVolume.register(name, mine);
    MemoryVolume.register(name, mine); // the same data again: no-op
    expect(() => MemoryVolume.register(name, MemoryVolume.create(B))).to.throw().with.property('code', 'TM_ERR_INTERNAL');
    const found = MemoryVolume.lookup(name);
    expect(found).to.equal(mine);
    const theirs = found!.handle({ readOnly: false });
    await theirs.write(2 * B, Buffer.from('shared'));
    await theirs.close();
    expect((await mine.read(2 * B, 6)).toString()).to.equal('shared');
    await mine.zero(2 * B, B);
    const again = MemoryVolume.lookup(name)!.handle({ readOnly: true });
    expect(await again.allocated()).to.deep.equal([]);
    expect(MemoryVolume.unregister(name)).to.equal(true);
    expect(MemoryVolume.unregister(name)).to.equal(false);
    expect(MemoryVolume.lookup(name)).to.equal(undefined);
    expect((await again.read(0, 1)).length).to.equal(1); // open handles outlive the name
  });

  it('clone() is an independent copy; sameContent compares what reads back, not allocation', async () => {
    const a = MemoryVolume.create(3 * 1024 * KiB + 7);
    await a.write(1024 * KiB - 3, Buffer.from('across a window edge'));
    await a.write(3 * 1024 * KiB, Buffer.from('tail!!!'));
    const b = a.clone();
    expect(await sameContent(a, b)).to.equal(true);
    expect(await b.allocated()).to.deep.equal(await a.allocated());
    await b.write(3 * 1024 * KiB + 6, Buffer.from('?'));
    expect((await a.read(3 * 1024 * KiB + 6, 1)).toString()).to.equal('!');
    expect(await sameContent(a, b)).to.equal(false);
    await a.write(3 * 1024 * KiB + 6, Buffer.from('?'));
    expect(await sameContent(a, b)).to.equal(true);
    // Zeros written vs. a hole: same content, different allocation.
    await a.write(2 * 1024 * KiB, Buffer.alloc(B));
    expect(await a.allocated()).to.not.deep.equal(await b.allocated());
    expect(await sameContent(a, b)).to.equal(true);
    // A difference in the middle of a later window, and a size mismatch.
    await b.write(2 * 1024 * KiB + 512 * KiB, Buffer.from([1]));
    expect(await sameContent(a, b)).to.equal(false);
    expect(await sameContent(a, MemoryVolume.create(a.size - 1))).to.equal(false);
    expect(await sameContent(MemoryVolume.create(0), MemoryVolume.create(0))).to.equal(true);
  });

  it('failNext makes the next such call reject, once, without doing it; errno errors are coded like the file backends', async () => {
    const v = MemoryVolume.create(4 * B);
    const h = v.handle();
    v.failNext('write', Object.assign(new Error('write failed: No space left on device'), { code: 'ENOSPC' }));
    const e = await rejection(h.write(0, Buffer.alloc(10, 1))); // another handle of the same data
    expect(e).to.have.property('code', 'TM_ERR_NO_SPACE');
    expect(await v.allocated()).to.deep.equal([]); // nothing written
    await h.write(0, Buffer.alloc(10, 1)); // only once
    v.failNext('read', new Error('EIO'));
    const r = await rejection(v.read(0, 1));
    expect(r).to.have.property('code', 'TM_ERR_VOLUME_IO');
    expect((r as Error).cause).to.be.instanceOf(Error).with.property('message', 'EIO');
    expect((await v.read(0, 1))[0]).to.equal(1);
    v.failNext('zero', new Error('nope'));
    expect(await rejection(v.zero(0, B))).to.have.property('code', 'TM_ERR_VOLUME_IO');
    expect(await v.allocated()).to.have.length(1);
    v.failNext('flush', new Error('nope'));
    expect(await rejection(v.flush())).to.have.property('code', 'TM_ERR_VOLUME_IO');
    expect(v.flushes).to.equal(0);
    await v.flush();
    expect(v.flushes).to.equal(1);
    // A call refused by its checks does not use up the fault.
    v.failNext('read', new Error('later'));
    expect(await rejection(v.read(4 * B, 1))).to.have.property('code', 'TM_ERR_VOLUME_RANGE');
    expect(await rejection(v.read(0, 1))).to.have.property('code', 'TM_ERR_VOLUME_IO');
  });
});
