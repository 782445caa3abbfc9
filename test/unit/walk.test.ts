import { expect } from 'chai';
import fc from 'fast-check';
import { MemoryVolume } from '../../src/volume/memory.js';
import type { ByteRange } from '../../src/volume/volume.js';
import { segments, walk, type Segment, type WalkItem } from '../../src/volume/walk.js';

const KiB = 1024;

const seg = (hole: boolean, offset: number, length: number): Segment => ({ hole, offset, length });

async function collect(items: AsyncIterable<WalkItem>): Promise<WalkItem[]> {
  const out: WalkItem[] = [];
  for await (const w of items) out.push(w);
  return out;
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => null,
    (e: unknown) => e,
  );
}

describe('segments(): byte ranges cut against the allocation map', () => {
  const alloc: ByteRange[] = [
    { offset: 100, length: 50 }, // [100, 150)
    { offset: 300, length: 250 }, // [300, 550)
  ];

  it('holes between allocated ranges, one per gap; allocated pieces of at most maxPiece from where each starts', () => {
    expect([...segments([[0, 600]], alloc, 100)]).to.deep.equal([
      seg(true, 0, 100),
      seg(false, 100, 50),
      seg(true, 150, 150),
      seg(false, 300, 100),
      seg(false, 400, 100),
      seg(false, 500, 50),
      seg(true, 550, 50),
    ]);
  });

  it('a range starting inside an allocated range cuts pieces from its own start; ranges share the map cursor', () => {
    expect([...segments([[120, 130], [140, 310], [320, 330], [549, 551], [700, 710]], alloc, 1000)]).to.deep.equal([
      seg(false, 120, 10),
      seg(false, 140, 10),
      seg(true, 150, 150),
      seg(false, 300, 10),
      seg(false, 320, 10),
      seg(false, 549, 1),
      seg(true, 550, 1),
      seg(true, 700, 10),
    ]);
  });

  it('empty ranges yield nothing; an empty map makes everything a hole; a hole-free range is only pieces', () => {
    expect([...segments([[5, 5], [10, 3]], alloc, 10)]).to.deep.equal([]);
    expect([...segments([[0, 10], [20, 30]], [], 4)]).to.deep.equal([seg(true, 0, 10), seg(true, 20, 10)]);
    expect([...segments([[300, 550]], alloc, 125)]).to.deep.equal([seg(false, 300, 125), seg(false, 425, 125)]);
  });

  it('the caller clips to the volume: a tail that is not a multiple of the chunk stays short', () => {
    // Bitmap runs [0, 2) and [3, 4) of 64 KiB chunks on a volume of 3 chunks + 100 bytes, as the sender builds them.
    const cs = 64 * KiB;
    const size = 3 * cs + 100;
    const runs: [number, number][] = [
      [0, 2],
      [3, 4],
    ];
    const ranges = runs.map(([a, b]): [number, number] => [a * cs, Math.min(b * cs, size)]);
    const map = [{ offset: cs, length: 2 * cs + 100 }];
    expect([...segments(ranges, map, cs)]).to.deep.equal([seg(true, 0, cs), seg(false, cs, cs), seg(false, 3 * cs, 100)]);
  });

  it('refuses a maxPiece that is not a positive integer and ranges that go backwards (TM_ERR_INTERNAL)', () => {
    expect(() => [...segments([[0, 10]], alloc, 0)]).to.throw().with.property('code', 'TM_ERR_INTERNAL');
    expect(() => [...segments([[0, 10]], alloc, 1.5)]).to.throw().with.property('code', 'TM_ERR_INTERNAL');
    expect(() => [...segments([[100, 200], [150, 160]], alloc, 10)]).to.throw().with.property('code', 'TM_ERR_INTERNAL');
  });

  /** Ascending, disjoint [start, end) ranges from gaps and lengths (touching allowed when `minGap` is 0). */
  const rangesArb = (minGap: number, minLen: number) =>
    fc.array(fc.tuple(fc.integer({ min: minGap, max: 40 }), fc.integer({ min: minLen, max: 60 })), { maxLength: 12 }).map((parts) => {
      const out: [number, number][] = [];
      let pos = 0;
      parts.forEach(([gap, len], i) => {
        const start = pos + (i === 0 ? gap - minGap : gap);
        out.push([start, start + len]);
        pos = start + len;
      });
      return out;
    });

  it('property: the segments are exactly the input ranges, in order; holes never touch alloc; pieces lie inside one allocated range', () => {
    fc.assert(
      fc.property(rangesArb(0, 0), rangesArb(1, 1), fc.integer({ min: 1, max: 70 }), (ranges, allocPairs, maxPiece) => {
        const map: ByteRange[] = allocPairs.map(([a, b]) => ({ offset: a, length: b - a }));
        const allocated = (x: number) => map.some((r) => x >= r.offset && x < r.offset + r.length);
        const got = [...segments(ranges, map, maxPiece)];
        // Concatenated, the segments give back the non-empty input ranges.
        const rebuilt: [number, number][] = [];
        for (const s of got) {
          expect(s.length).to.be.greaterThan(0);
          const last = rebuilt[rebuilt.length - 1];
          if (last && last[1] === s.offset && ranges.some(([a, b]) => a <= last[0] && s.offset + s.length <= b)) last[1] = s.offset + s.length;
          else rebuilt.push([s.offset, s.offset + s.length]);
        }
        expect(rebuilt).to.deep.equal(ranges.filter(([a, b]) => b > a));
        for (const [i, s] of got.entries()) {
          if (s.hole) {
            for (let x = s.offset; x < s.offset + s.length; x++) expect(allocated(x), `byte ${x} of a hole is allocated`).to.equal(false);
            // One hole per gap: never two holes in a row inside one range.
            const prev = got[i - 1];
            if (prev?.hole && prev.offset + prev.length === s.offset) {
              expect(ranges.some(([a, b]) => a <= prev.offset && s.offset + s.length <= b), 'two holes in a row in one range').to.equal(false);
            }
          } else {
            expect(s.length).to.be.at.most(maxPiece);
            const r = map.find((m) => s.offset >= m.offset && s.offset < m.offset + m.length);
            expect(r, `piece at ${s.offset} in an allocated range`).to.not.equal(undefined);
            expect(s.offset + s.length).to.be.at.most(r!.offset + r!.length);
          }
        }
      }),
      { numRuns: 500 },
    );
  });
});

describe('walk(): holes and allocated windows of a volume, in order', () => {
  const CS = 16 * KiB;

  /** A volume of 10 chunks + 100 bytes: chunk 1 and chunks 4..6 written, and the short tail. */
  async function fixture(): Promise<MemoryVolume> {
    const v = MemoryVolume.create(10 * CS + 100);
    await v.write(1 * CS + 5, Buffer.from('one'));
    await v.write(4 * CS, Buffer.alloc(3 * CS, 4));
    await v.write(10 * CS + 99, Buffer.from([9]));
    return v;
  }

  it('holes come as one null item per run; allocated chunks in reads of at most `window`, the data as read', async () => {
    const v = await fixture();
    const items = await collect(walk(v, { from: 0, to: v.size, window: 2 * CS, chunkSize: CS }));
    expect(items.map((w) => [w.offset, w.length, w.data === null])).to.deep.equal([
      [0, CS, true],
      [CS, CS, false],
      [2 * CS, 2 * CS, true],
      [4 * CS, 2 * CS, false],
      [6 * CS, CS, false],
      [7 * CS, 3 * CS, true],
      [10 * CS, 100, false], // the tail: not a multiple of the chunk
    ]);
    for (const w of items) if (w.data) expect(w.data.equals(await v.read(w.offset, w.length))).to.equal(true);
    expect(items[1]!.data!.subarray(5, 8).toString()).to.equal('one');
    expect(items[6]!.data![99]).to.equal(9);
  });

  it('reads only allocated data: as many reads as windows', async () => {
    const v = await fixture();
    const before = v.reads;
    await collect(walk(v, { from: 0, to: v.size, window: 2 * CS, chunkSize: CS }));
    expect(v.reads - before).to.equal(4);
  });

  it('a sub-range; a window that is not whole chunks is rounded down to whole chunks (at least one)', async () => {
    const v = await fixture();
    const items = await collect(walk(v, { from: 5 * CS, to: 8 * CS, window: CS + 1, chunkSize: CS }));
    expect(items.map((w) => [w.offset, w.length, w.data === null])).to.deep.equal([
      [5 * CS, CS, false],
      [6 * CS, CS, false],
      [7 * CS, CS, true],
    ]);
    const tiny = await collect(walk(v, { from: 4 * CS, to: 6 * CS, window: 10, chunkSize: CS }));
    expect(tiny.map((w) => w.length)).to.deep.equal([CS, CS]);
  });

  it('a given map is used instead of asking the volume (and is cut to the range)', async () => {
    const v = await fixture();
    const items = await collect(walk(v, { from: 0, to: 4 * CS, window: 8 * CS, chunkSize: CS, alloc: [{ offset: 2 * CS, length: 8 * CS }] }));
    expect(items.map((w) => [w.offset, w.length, w.data === null])).to.deep.equal([
      [0, 2 * CS, true],
      [2 * CS, 2 * CS, false],
    ]);
  });

  it('an aborted signal stops it before the next read; a range outside the volume is TM_ERR_VOLUME_RANGE', async () => {
    const v = await fixture();
    const ac = new AbortController();
    const seen: number[] = [];
    const run = (async () => {
      for await (const w of walk(v, { from: 0, to: v.size, window: CS, chunkSize: CS, signal: ac.signal })) {
        seen.push(w.offset);
        if (w.data) ac.abort(new Error('stop here'));
      }
    })();
    const e = await rejection(run);
    expect(e).to.be.instanceOf(Error).with.property('message', 'stop here');
    expect(seen).to.deep.equal([0, CS, 2 * CS]); // the hole after the first read still came, the next read did not
    for (const [from, to] of [
      [0, v.size + 1],
      [-1, 10],
      [10, 5],
    ] as const) {
      expect(await rejection(collect(walk(v, { from, to, window: CS, chunkSize: CS })))).to.have.property('code', 'TM_ERR_VOLUME_RANGE');
    }
  });
});
