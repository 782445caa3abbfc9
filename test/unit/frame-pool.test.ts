import { expect } from 'chai';
import { FRAME_POOL_GRAIN, FramePool } from '../../src/wire/frame-pool.js';

describe('frame pool: outgoing frame buffers reused once written', () => {
  it('rounds sizes up to the grain and hands a given-back buffer out again for the same size', () => {
    const p = new FramePool();
    const a = p.take(1024 * 1024 + 100);
    expect(a.length).to.equal(1024 * 1024 + FRAME_POOL_GRAIN);
    p.give(a);
    expect(p.held).to.equal(a.length);
    expect(p.take(1024 * 1024 + 5000)).to.equal(a);
    expect(p.held).to.equal(0);
    expect(p.take(1024 * 1024 + 5000)).not.to.equal(a); // taken: a new one
    const small = p.take(100);
    expect(small.length).to.equal(FRAME_POOL_GRAIN);
  });

  it('keeps at most its bound of free bytes', () => {
    const p = new FramePool(2 * FRAME_POOL_GRAIN);
    const bufs = [p.take(1), p.take(1), p.take(1)];
    for (const b of bufs) p.give(b);
    expect(p.held).to.equal(2 * FRAME_POOL_GRAIN);
  });
});
