import { expect } from 'chai';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ScanSource } from '../../src/track/scan.js';
import { MemoryVolume } from '../../src/volume/memory.js';
import { SparseFileVolume } from '../../src/volume/sparse-file.js';

const KiB = 1024;
const CS = 64 * KiB;

describe('scan change source: digests of allocated chunks vs. what was sent', () => {
  let dir: string;
  let vol: SparseFileVolume;
  beforeEach(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'tm-scan-'));
    vol = await SparseFileVolume.open(path.join(dir, 'v.img'), { create: { size: 16 * CS + 100 } });
  });
  afterEach(async () => {
    await vol.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Record the volume's current content as sent, as the mirror does during a generation. */
  async function sendAll(src: ScanSource): Promise<void> {
    for (let c = 0; c * CS < vol.size; c++) {
      const len = Math.min(CS, vol.size - c * CS);
      src.recordSent(c, await vol.read(c * CS, len));
    }
  }

  it('without state every chunk is unknown; after sending, nothing changed', async () => {
    await vol.write(3 * CS, Buffer.alloc(CS, 1));
    const src = new ScanSource(vol, CS, dir);
    await src.open();
    expect((await src.detect(1)).bitmap.size).to.equal(17);
    await sendAll(src);
    const d = await src.detect(1);
    expect(d.bitmap.size).to.equal(0);
    expect(d.readBytes).to.equal(CS); // only the allocated chunk was read
  });

  it('finds written chunks, a new extent, a punched hole and the partial tail; not zeros over a hole', async () => {
    await vol.write(2 * CS, Buffer.alloc(2 * CS, 5));
    const src = new ScanSource(vol, CS, dir);
    await sendAll(src);
    await vol.write(2 * CS + 10, Buffer.from('x')); // change inside
    await vol.write(9 * CS, Buffer.alloc(4096, 9)); // new extent
    await vol.write(16 * CS + 50, Buffer.from('tail')); // the partial last chunk
    await vol.zero(3 * CS, CS); // punched hole
    await vol.write(12 * CS, Buffer.alloc(CS)); // zeros written over a hole: reads the same
    expect((await src.detect(1)).bitmap.toArray()).to.deep.equal([2, 3, 9, 16]);
  });

  it('digests survive a restart (persist + open); a torn/foreign digest file size is a coded error', async () => {
    await vol.write(5 * CS, Buffer.alloc(CS, 3));
    const a = new ScanSource(vol, CS, dir);
    await sendAll(a);
    await a.persist();
    await vol.write(5 * CS, Buffer.alloc(10, 4));
    const b = new ScanSource(vol, CS, dir);
    await b.open();
    expect((await b.detect(1)).bitmap.toArray()).to.deep.equal([5]);
    // In-place persistence of a dirty range only.
    b.recordSent(5, await vol.read(5 * CS, CS));
    await b.persist();
    const c = new ScanSource(vol, CS, dir);
    await c.open();
    expect((await c.detect(1)).bitmap.size).to.equal(0);
    // A digest file for another chunk count.
    const other = new ScanSource(vol, 4 * CS, dir);
    const e = await other.open().then(() => null, (x: unknown) => x);
    expect(e).to.have.property('code', 'TM_ERR_STATE');
  });

  it('a chunk recorded while a persist is running is persisted by the next one, not forgotten', async () => {
    const a = new ScanSource(vol, CS, dir);
    await sendAll(a);
    await a.persist();
    await vol.write(7 * CS, Buffer.alloc(CS, 8));
    await vol.write(9 * CS, Buffer.alloc(CS, 9));
    a.recordSent(7, await vol.read(7 * CS, CS));
    const running = a.persist();
    // Recorded after the write began (the persist is past its first await).
    a.recordSent(9, await vol.read(9 * CS, CS));
    await running;
    await a.persist();
    const b = new ScanSource(vol, CS, dir);
    await b.open();
    expect((await b.detect(1)).bitmap.toArray()).to.deep.equal([]);
  });

  it('reads allocated data in 4 MiB windows and counts them in readBytes; a memory volume with the same content detects the same', async () => {
    const size = 100 * CS + 100;
    const big = 5 * 1024 * KiB; // one run longer than a scan read
    const file = await SparseFileVolume.open(path.join(dir, 'big.img'), { create: { size } });
    const mem = MemoryVolume.create(size);
    try {
      const memDir = path.join(dir, 'mem');
      mkdirSync(memDir);
      const onFile = new ScanSource(file, CS, dir);
      const onMem = new ScanSource(mem, CS, memDir);
      for (const v of [file, mem]) {
        await v.write(CS, Buffer.alloc(big, 6));
        await v.write(100 * CS + 99, Buffer.from([1]));
      }
      for (const [v, src] of [[file, onFile], [mem, onMem]] as const) {
        for (let c = 0; c * CS < size; c++) src.recordSent(c, await v.read(c * CS, Math.min(CS, size - c * CS)));
        await v.write(3 * CS, Buffer.from('x'));
        await v.zero(100 * CS, 100); // the short tail chunk is zeroed (it stays allocated, as on ext4)
        await v.write(90 * CS, Buffer.alloc(CS)); // zeros over a hole: reads the same
      }
      const before = mem.reads;
      const a = await onFile.detect(1);
      const b = await onMem.detect(1);
      expect(a.bitmap.toArray()).to.deep.equal([3, 100]);
      expect(b.bitmap.toArray()).to.deep.equal([3, 100]);
      expect(a.readBytes).to.equal(big + CS + 100);
      expect(b.readBytes).to.equal(big + CS + 100);
      expect(mem.reads - before).to.equal(4); // 4 MiB + 1 MiB, chunk 90, the tail
    } finally {
      await file.close();
    }
  });

  it('an aborted signal stops detect before it reads, with the reason', async () => {
    const mem = MemoryVolume.create(16 * CS);
    await mem.write(2 * CS, Buffer.alloc(CS, 1));
    const src = new ScanSource(mem, CS, dir);
    const ac = new AbortController();
    ac.abort(new Error('shutting down'));
    const e = await src.detect(1, { signal: ac.signal }).then(() => null, (x: unknown) => x);
    expect(e).to.be.instanceOf(Error).with.property('message', 'shutting down');
    expect(mem.reads).to.equal(0);
  });
});
