import { expect } from 'chai';
import fc from 'fast-check';
import { BufferRing } from '../../src/util/buffer-ring.js';

describe('read ring', () => {
  it('hands out disjoint buffers, reuses memory in FIFO order, and falls back to fresh buffers when full', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.integer({ min: 1, max: 300 }), fc.integer({ min: 0, max: 3 })), { maxLength: 200 }), (ops) => {
        const ring = new BufferRing(1000);
        const live: { b: Buffer; fill: number }[] = [];
        let n = 0;
        for (const [len, frees] of ops) {
          for (let i = 0; i < frees && live.length; i++) {
            const { b, fill } = live.shift()!;
            // nothing else wrote over it while it was live
            expect(b.every((x) => x === fill)).to.equal(true);
            ring.release(b);
          }
          const b = ring.take(len);
          expect(b.length).to.equal(len);
          const fill = ++n & 0xff;
          b.fill(fill);
          live.push({ b, fill });
        }
        for (const { b, fill } of live) expect(b.every((x) => x === fill)).to.equal(true);
      }),
    );
  });

  it('reuses the same memory once everything was given back', () => {
    const ring = new BufferRing(1024);
    const a = ring.take(600);
    ring.release(a);
    const b = ring.take(600);
    expect(b.buffer).to.equal(a.buffer);
    expect(b.byteOffset).to.equal(a.byteOffset);
    const big = ring.take(2000);
    expect(big.buffer).to.not.equal(a.buffer);
    ring.release(big); // not from the ring: ignored
    ring.release(b);
  });
});
