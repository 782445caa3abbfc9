import { expect } from 'chai';
import { closeSync, ftruncateSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { pino } from 'pino';
import { MirrorMetrics } from '../../src/daemon/metrics.js';
import { Mirror } from '../../src/mirror/mirror.js';
import { native, type NativeOps } from '../../src/native/index.js';
import { openVolume } from '../../src/volume/factory.js';
import { MemoryVolume } from '../../src/volume/memory.js';
import { SparseFileVolume } from '../../src/volume/sparse-file.js';
import type { ByteRange, Volume } from '../../src/volume/volume.js';
import { digestRange } from '../../src/volume/walk.js';
import { prng, textLike } from '../../src/util/sample.js';
import { memoryMirrorConfig } from '../helpers/mirror-pair.js';

/*
 * Issue 14 §4: the main thread never stalls on a big map. What is checked here
 * is interleaving, not time: a callback queued on the event loop right after
 * a long walk starts runs before the walk ends (it yields), and status never
 * waits for a walk at all.
 */

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** Resolves with whether `setImmediate` (queued now) ran before `work` finished. */
async function yieldsDuring<T>(work: () => Promise<T>): Promise<{ ranBefore: boolean; result: T }> {
  let ran = false;
  setImmediate(() => (ran = true));
  const result = await work();
  const ranBefore = ran;
  return { ranBefore, result };
}

describe('the event loop during big allocation maps and digests (issue 14 §4)', function () {
  this.timeout(60_000);
  let dir: string;
  before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-loop-'))));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('allocated() of a map of 262,144 extents runs its system calls off the main thread, in batches, yields between them, and gives the same map', async () => {
    // A sparse file whose seekMap says: 4 KiB of data every 8 KiB (2 GiB apparent).
    const f = path.join(dir, 'big.img');
    const fd = openSync(f, 'w');
    ftruncateSync(fd, 2 * GiB);
    closeSync(fd);
    const real = native();
    let batches = 0;
    const ops: NativeOps = {
      ...real,
      // The walk must not make its system calls on the event loop's thread.
      seekData: () => expect.fail('seekData (synchronous, on the main thread) called by the walk'),
      seekHole: () => expect.fail('seekHole (synchronous, on the main thread) called by the walk'),
      seekMap: async (_fd, from, to, max) => {
        batches++;
        await new Promise((r) => setImmediate(r)); // the threadpool answers later
        const out: number[] = [];
        for (let at = Math.ceil(from / (8 * KiB)) * 8 * KiB; at < to && out.length < 2 * max; at += 8 * KiB) out.push(at, at + 4 * KiB);
        return Float64Array.from(out);
      },
    };
    const v = await SparseFileVolume.open(f, { readOnly: true, ops });
    try {
      const { ranBefore, result } = await yieldsDuring(() => v.allocated());
      expect(batches, 'batches of 16,384 ranges').to.equal(262_144 / 16_384 + 1);
      expect(result).to.have.length(262_144);
      expect(result[1]).to.deep.equal({ offset: 8 * KiB, length: 4 * KiB });
      expect(ranBefore, 'a callback queued after the walk started ran before it ended').to.equal(true);
      expect(await v.allocatedBytes()).to.equal(262_144 * 4 * KiB);
      // Aligned to 8 KiB every range touches the next: one range.
      expect(await v.allocated(8 * KiB)).to.deep.equal([{ offset: 0, length: 2 * GiB }]);
    } finally {
      await v.close();
    }
  });

  it("the addon's seekMap (threadpool) finds what seekData/seekHole find, batch after batch, on a real file", async () => {
    const f = path.join(dir, 'seekmap.img');
    const fd = openSync(f, 'w');
    const offsets = [0, 64 * KiB, 1 * MiB, 3 * MiB - 4 * KiB, 5 * MiB];
    for (const off of offsets) writeSync(fd, Buffer.alloc(4 * KiB, 0xcd), 0, 4 * KiB, off);
    ftruncateSync(fd, 6 * MiB);
    const ops = native();
    try {
      const want: number[] = [];
      for (let pos = 0; ; ) {
        const d = ops.seekData(fd, pos);
        if (d < 0) break;
        const h = ops.seekHole(fd, d);
        want.push(d, h);
        pos = h;
      }
      expect(want.length / 2).to.equal(offsets.length);
      expect([...(await ops.seekMap(fd, 0, 6 * MiB, 1000))]).to.deep.equal(want);
      // Two at a time, each batch from where the last one ended.
      const got: number[] = [];
      for (let pos = 0; ; ) {
        const b = await ops.seekMap(fd, pos, 6 * MiB, 2);
        got.push(...b);
        if (b.length < 4) break;
        pos = b[b.length - 1]!;
      }
      expect(got).to.deep.equal(want);
      // Up to `to` only (a range that starts before it is returned whole: the caller clips).
      expect([...(await ops.seekMap(fd, 64 * KiB, 1 * MiB, 100))]).to.deep.equal([64 * KiB, 68 * KiB]);
      expect([...(await ops.seekMap(fd, 5 * MiB + 4 * KiB, 6 * MiB, 100))]).to.deep.equal([]);
      await ops.seekMap(99999, 0, 1, 1).then(
        () => expect.fail('a bad descriptor must reject'),
        (e: NodeJS.ErrnoException) => expect(e).to.include({ code: 'EBADF' }),
      );
      expect(() => ops.seekMap(fd, 0, 1, 0)).to.throw(TypeError);
    } finally {
      closeSync(fd);
    }
  });

  it('allocated(alignTo, within) maps only the range asked for (real SEEK_DATA/SEEK_HOLE)', async () => {
    const f = path.join(dir, 'few.img');
    const fd = openSync(f, 'w');
    for (const off of [0, 1 * MiB, 2 * MiB + 4 * KiB, 5 * MiB]) writeSync(fd, Buffer.alloc(8 * KiB, 0xab), 0, 8 * KiB, off);
    ftruncateSync(fd, 8 * MiB);
    closeSync(fd);
    const v = await SparseFileVolume.open(f, { readOnly: true });
    try {
      const all = await v.allocated();
      expect(all.map((r) => r.offset)).to.deep.equal([0, 1 * MiB, 2 * MiB + 4 * KiB, 5 * MiB]);
      const within: ByteRange = { offset: 1 * MiB + 4 * KiB, length: 3 * MiB };
      expect(await v.allocated(undefined, within)).to.deep.equal([
        { offset: 1 * MiB + 4 * KiB, length: 4 * KiB },
        { offset: 2 * MiB + 4 * KiB, length: 8 * KiB },
      ]);
      expect(await v.allocated(64 * KiB, within)).to.deep.equal([
        { offset: 1 * MiB, length: 64 * KiB },
        { offset: 2 * MiB, length: 64 * KiB },
      ]);
      expect(await v.allocated(64 * KiB, { offset: 3 * MiB, length: 1 * MiB })).to.deep.equal([]);
    } finally {
      await v.close();
    }
  });

  it('digestRange of 16 MiB of 4 KiB chunks yields between chunks (the volume answers at once: no I/O to wait for)', async () => {
    const v = MemoryVolume.create(16 * MiB);
    await v.write(0, textLike(16 * MiB, prng(1)));
    const { ranBefore, result } = await yieldsDuring(() => digestRange(v, 0, 16 * MiB, 4 * KiB));
    expect(result.length).to.equal(4096 * 16);
    expect(ranBefore, 'a callback queued after digesting started ran before it ended').to.equal(true);
  });

  it("a secondary's status never waits for a walk of its target's map", async () => {
    // The target's map never comes back until released: status must answer meanwhile.
    const name = `walk-${process.pid}`;
    const mem = MemoryVolume.create(1 * MiB, { path: `memory:${name}` });
    MemoryVolume.register(name, mem);
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    let walks = 0;
    const stuck = (v: Volume): Volume =>
      new Proxy(v, {
        get(t, k) {
          if (k === 'allocated') {
            return async (...a: Parameters<Volume['allocated']>) => {
              walks++;
              await released;
              return t.allocated(...a);
            };
          }
          const x = Reflect.get(t, k) as unknown;
          return typeof x === 'function' ? (x as (...a: unknown[]) => unknown).bind(t) : x;
        },
      });
    const stateDir = mkdtempSync(path.join(dir, 'state-'));
    const m = new Mirror(memoryMirrorConfig('vm1', 'secondary', `memory:${name}`), {
      nodeName: 'site-b',
      stateDir,
      psk: Buffer.alloc(32, 1),
      log: pino({ level: 'silent' }),
      openVolume: async (p, o) => stuck(await openVolume(p, o)),
    });
    try {
      await m.start();
      const s1 = await m.status();
      const s2 = await m.status();
      expect(s1.role).to.equal('secondary');
      expect(s2.allocatedBytes).to.equal(0);
      expect(walks, 'a walk was started, and only one at a time').to.equal(1);
      // The walk, once done, gives its figure to a later status.
      await mem.write(0, Buffer.alloc(8 * KiB, 1));
      release();
      let st = await m.status();
      for (let i = 0; i < 1000 && st.allocatedBytes === 0; i++) {
        await new Promise((r) => setTimeout(r, 2));
        st = await m.status();
      }
      expect(st.allocatedBytes).to.equal(8 * KiB);
    } finally {
      release();
      await m.stop();
      MemoryVolume.unregister(name);
    }
  });

  it('the metrics expose the event-loop delay (prom-client default metrics: nodejs_eventloop_lag_p99_seconds and its friends)', async () => {
    const metrics = new MirrorMetrics(() => [], { node: 'n', version: 'v' });
    const text = await metrics.scrape();
    for (const name of ['nodejs_eventloop_lag_seconds', 'nodejs_eventloop_lag_p99_seconds', 'nodejs_eventloop_lag_max_seconds']) {
      expect(text, name).to.match(new RegExp(`^${name} [0-9.e+-]+$`, 'm'));
    }
  });
});
