import { expect } from 'chai';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { createSampleVolume } from '../../src/util/sample.js';
import { FaultProxy } from '../helpers/fault-proxy.js';
import { freePort } from '../helpers/pair-config.js';
import { Pair, sha256File } from '../helpers/pair.js';
import { LoopFs } from '../helpers/xfs.js';

const MiB = 1024 * 1024;

describe('integration: faults between and under the daemons (real TCP proxy, real full filesystem)', function () {
  this.timeout(300_000);
  let pair: Pair | undefined;
  let proxy: FaultProxy | undefined;
  let fs: LoopFs | undefined;
  afterEach(async () => {
    await proxy?.close();
    await pair?.cleanup();
    await fs?.cleanup();
    proxy = undefined;
    pair = undefined;
    fs = undefined;
  });

  /** A pair whose primary reaches the secondary through a FaultProxy. */
  async function proxiedPair(allocated: number): Promise<Pair> {
    const p = await Pair.create();
    await createSampleVolume(p.source, { size: 1024 * MiB, allocated, extents: 16, content: 'random' });
    const port = await freePort();
    proxy = await FaultProxy.start({ target: { host: '127.0.0.1', port } });
    await p.writeConfigs({
      port,
      peerPort: proxy.port,
      extraPrimary: { reconnect: { min: '100ms', max: '1s' } },
      extraSecondary: { checkpoint: { bytes: '2MiB', interval: '1s' } },
    });
    return p;
  }

  it('the link is cut 10 times during a sync: it converges and resends at most 10% of the allocated bytes', async () => {
    const allocated = 384 * MiB;
    pair = await proxiedPair(allocated);
    await pair.startSecondary().waitReady();
    pair.startPrimary();
    let applied = 0;
    for (let cut = 0; cut < 10; cut++) {
      // Cut only a live connection that has carried data, after the sync made
      // progress since the last cut: every cut lands mid-transfer. (Progress
      // alone is not enough: after a cut the secondary still applies what it
      // had received, so two cuts could otherwise fall between connections.)
      const from = applied;
      const st = await pair.secondary!.waitFor(
        (s) => s.mirrors[0]!.appliedBytes >= from + 12 * MiB && proxy!.liveBytesToTarget >= 4 * MiB,
        60_000,
        `progress on a live connection before cut ${cut + 1}`,
        20,
      );
      applied = st.mirrors[0]!.appliedBytes;
      expect(st.mirrors[0]!.committedGeneration, 'the sync is still running').to.equal(0);
      expect(proxy!.cut(), `cut ${cut + 1} destroys the live connection`).to.equal(1);
    }
    expect(proxy!.counters.cuts).to.equal(10);
    await pair.waitInSync(1, 120_000);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
    const total = (await pair.secondaryMirror()).appliedBytes;
    const resent = total - allocated;
    console.log(`      10 cuts: ${(resent / MiB).toFixed(1)} MiB resent of ${allocated / MiB} MiB (${((100 * resent) / allocated).toFixed(1)}%), ${proxy!.counters.accepted} connections`);
    expect(proxy!.counters.accepted).to.be.at.least(11);
    expect(resent).to.be.at.most(0.1 * allocated);
  });

  it('a flipped byte in a data payload is caught by the frame MAC (before the checksum): session dropped with TM_ERR_FRAME_AUTH, the extent resent, the target identical', async () => {
    pair = await proxiedPair(64 * MiB);
    await pair.startSecondary().waitReady();
    // Random data travels raw: 5.5 MiB into the stream is inside the 6th 1 MiB payload.
    const flipped = proxy!.corruptNext({ direction: 'toTarget', afterBytes: 5.5 * MiB, xor: 0x20 });
    pair.startPrimary();
    const report = await flipped;
    expect(report.connection).to.equal(1);
    await pair.waitInSync(1, 60_000);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
    // Protocol v3: the tag of every frame is checked before it is decoded (docs/protocol.md, "Frame integrity").
    expect(pair.secondary!.logTail(60)).to.contain('TM_ERR_FRAME_AUTH');
    expect(pair.primary!.logTail(60)).to.contain('TM_ERR_FRAME_AUTH');
    expect(proxy!.counters.accepted).to.be.at.least(2);
  });

  it("the secondary's filesystem fills up: error TM_ERR_NO_SPACE, bitmaps kept, committed state intact; freed space resumes by itself", async () => {
    fs = await LoopFs.create('ext4', 160 * MiB);
    pair = await Pair.create();
    const target = path.join(fs.mount, 'target.img');
    await createSampleVolume(pair.source, { size: 512 * MiB, allocated: 24 * MiB, extents: 4, content: 'random' });
    await pair.writeConfigs({
      target,
      extraPrimary: { reconnect: { min: '200ms', max: '1s' } },
    });
    // Ballast leaves about 60 MiB free on the target's filesystem.
    const ballast = path.join(fs.mount, 'ballast');
    await fsp.writeFile(ballast, Buffer.alloc(70 * MiB, 1));
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    await pair.waitInSync(1);
    // 64 MiB more data: does not fit.
    const fh = await fsp.open(pair.source, 'r+');
    const junk = Buffer.alloc(MiB);
    for (let i = 0; i < 64; i++) {
      for (let j = 0; j < junk.length; j += 4) junk.writeUInt32LE((i * 7919 + j * 31) >>> 0, j);
      await fh.write(junk, 0, MiB, 300 * MiB + i * MiB);
    }
    await fh.close();
    const st = await pair.primary!.waitFor((s) => s.mirrors[0]!.error?.code === 'TM_ERR_NO_SPACE', 60_000, 'the no-space error');
    expect(st.mirrors[0]!.state).to.equal('error');
    // The writes may have been split over two passes; whatever committed stays committed on both sides.
    const committed = st.mirrors[0]!.committedGeneration;
    expect(committed).to.be.at.least(1);
    expect(st.mirrors[0]!.generation).to.equal(committed + 1);
    const sec = await pair.secondaryMirror();
    expect(sec.committedGeneration).to.equal(committed);
    expect(sec.error?.code).to.equal('TM_ERR_NO_SPACE');
    // The generation's bitmap is still on the primary's disk.
    const pending = st.mirrors[0]!.generation;
    expect(existsSync(path.join(pair.cfg.primaryState, 'vm1', `gen-${pending}.roaring`))).to.equal(true);
    await fsp.rm(ballast);
    await pair.waitInSync(pending, 60_000);
    expect(await sha256File(target)).to.equal(await sha256File(pair.source));
  });
});
