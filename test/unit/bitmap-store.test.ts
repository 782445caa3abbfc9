import { expect } from 'chai';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BitmapStore, bitmapRuns, RoaringBitmap32 } from '../../src/track/bitmap-store.js';

describe('bitmap-store: generation bitmaps on disk', () => {
  let dir: string;
  beforeEach(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-bm-'))));
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('round-trips a bitmap in the portable roaring format', async () => {
    const store = new BitmapStore(dir);
    const b = new RoaringBitmap32([1, 5, 7, 100000, 4294967294]);
    b.addRange(2000, 3000);
    await store.save(3, b);
    const back = await store.load(3);
    expect(back.isEqual(b)).to.equal(true);
    // The file is the portable serialization, readable by any roaring implementation.
    const again = RoaringBitmap32.deserialize(readFileSync(store.fileFor(3)), 'portable');
    expect(again.size).to.equal(b.size);
    expect(readdirSync(dir)).to.deep.equal(['gen-3.roaring']); // no temp file left
  });

  it('lists generations ascending and ignores other files', async () => {
    const store = new BitmapStore(dir);
    await store.save(10, new RoaringBitmap32([1]));
    await store.save(2, new RoaringBitmap32([1]));
    writeFileSync(path.join(dir, '.gen-4.roaring.tmp-1-abcd'), 'torn');
    writeFileSync(path.join(dir, 'state.json'), '{}');
    expect(await store.list()).to.deep.equal([2, 10]);
    await store.remove(2);
    expect(await store.list()).to.deep.equal([10]);
  });

  it('a corrupt bitmap file is a coded state error naming the file', async () => {
    const store = new BitmapStore(dir);
    writeFileSync(store.fileFor(1), Buffer.from([1, 2, 3, 4, 5]));
    try {
      await store.load(1);
      expect.fail('should throw');
    } catch (e) {
      expect((e as { code: string }).code).to.equal('TM_ERR_STATE');
      expect((e as Error).message).to.contain('gen-1.roaring');
    }
  });

  it('bitmapRuns yields merged runs from a starting chunk, across window boundaries', () => {
    const b = new RoaringBitmap32();
    b.addRange(0, 3);
    b.add(10);
    b.addRange(65530, 65545); // crosses the 65536 paging window
    b.addRange(200000, 200002);
    expect([...bitmapRuns(b)]).to.deep.equal([
      [0, 3],
      [10, 11],
      [65530, 65545],
      [200000, 200002],
    ]);
    expect([...bitmapRuns(b, 2)]).to.deep.equal([
      [2, 3],
      [10, 11],
      [65530, 65545],
      [200000, 200002],
    ]);
    expect([...bitmapRuns(b, 65540)]).to.deep.equal([
      [65540, 65545],
      [200000, 200002],
    ]);
    expect([...bitmapRuns(new RoaringBitmap32())]).to.deep.equal([]);
  });

  it('bitmapRuns pages through bitmaps of more values than one window holds', () => {
    const b = new RoaringBitmap32();
    b.addRange(0, 200_000); // one run spanning several pages
    for (let i = 0; i < 70_000; i++) b.add(300_000 + 2 * i); // isolated values over two pages
    const runs = [...bitmapRuns(b, 5)];
    expect(runs[0]).to.deep.equal([5, 200_000]);
    expect(runs.length).to.equal(1 + 70_000);
    expect(runs[runs.length - 1]).to.deep.equal([300_000 + 2 * 69_999, 300_000 + 2 * 69_999 + 1]);
    let total = 0;
    for (const [a, c] of runs) total += c - a;
    expect(total).to.equal(b.size - 5);
  });
});
