import { expect } from 'chai';
import { promises as fsp } from 'node:fs';
import { createSampleVolume } from '../../src/util/sample.js';
import { SparseFileVolume } from '../../src/volume/sparse-file.js';
import { totalBytes } from '../../src/volume/volume.js';
import { Pair, sha256File } from '../helpers/pair.js';
import { LoopFs } from '../helpers/xfs.js';

const MiB = 1024 * 1024;
const CS = 64 * 1024;

describe('integration: tracking.mode auto picks the change source; status shows what a cycle cost', function () {
  this.timeout(180_000);
  let pair: Pair | undefined;
  let fs: LoopFs | undefined;
  afterEach(async () => {
    await pair?.cleanup();
    await fs?.cleanup();
    pair = undefined;
    fs = undefined;
  });

  async function changeChunks(file: string): Promise<number> {
    const fh = await fsp.open(file, 'r+');
    // 3 chunks written (one of them twice), 1 new chunk in a hole.
    await fh.write(Buffer.alloc(4096, 1), 0, 4096, 10 * CS + 8192);
    await fh.write(Buffer.alloc(2 * CS, 2), 0, 2 * CS, 40 * CS);
    await fh.write(Buffer.alloc(100, 3), 0, 100, 40 * CS + 5);
    await fh.write(Buffer.alloc(CS, 4), 0, CS, 200 * CS);
    await fh.close();
    return 4 * CS;
  }

  it('on XFS with reflink: auto uses reflink, a cycle reads only the changed chunks (lastCycle)', async () => {
    fs = await LoopFs.create('xfs', 1024 * MiB);
    pair = await Pair.create('vm1', fs.mount);
    await createSampleVolume(pair.source, { size: 64 * MiB, allocated: 16 * MiB, extents: 4, content: 'random' });
    await pair.writeConfigs({ extraPrimary: { tracking: { mode: 'auto', interval: '1s' } } });
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const first = await pair.waitInSync(1);
    expect(first.trackingMode).to.equal('reflink');
    expect(pair.primary!.logTail(40)).to.contain('tracking.mode auto: reflink works');
    const changed = await changeChunks(pair.source);
    const m = await pair.waitInSync(first.committedGeneration + 1);
    const c = m.lastCycle!;
    expect(c.generation).to.equal(m.committedGeneration);
    expect(c.changedBytes).to.equal(changed);
    // Metadata only: what was read is the changed chunks, nothing for detection.
    expect(c.readBytes).to.equal(changed);
    expect(c.wireBytes).to.be.greaterThan(0);
    expect(c.durationSeconds).to.be.greaterThan(0);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
  });

  it('where the state directory cannot reflink the volume, auto uses scan and says why; scan cycles read all allocated data', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 64 * MiB, allocated: 16 * MiB, extents: 4, content: 'random' });
    await pair.writeConfigs({ extraPrimary: { tracking: { mode: 'auto', interval: '1s' } } });
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const first = await pair.waitInSync(1);
    expect(first.trackingMode).to.equal('scan');
    expect(pair.primary!.logTail(40)).to.match(/tracking.mode auto: .*; using scan/);
    const changed = await changeChunks(pair.source);
    const m = await pair.waitInSync(first.committedGeneration + 1);
    expect(m.lastCycle!.changedBytes).to.equal(changed);
    // The whole allocated data (in whole chunks) for detection, then the changed chunks again.
    const v = await SparseFileVolume.open(pair.source, { readOnly: true });
    const allocated = totalBytes(await v.allocated(CS));
    await v.close();
    expect(m.lastCycle!.readBytes).to.equal(allocated + changed);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
  });

  it('tracking.mode reflink where it cannot work refuses to start the mirror with TM_ERR_TRACKING naming the reason', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 16 * MiB, allocated: 4 * MiB, extents: 2 });
    await pair.writeConfigs({ extraPrimary: { tracking: { mode: 'reflink', interval: '1s' } } });
    await pair.startSecondary().waitReady();
    // The daemon keeps running (other mirrors would go on); this mirror reports the error.
    const st = await pair.startPrimary().waitFor((s) => s.mirrors[0]?.error != null, 20_000, 'the mirror error');
    expect(st.mirrors[0]!.error!.code).to.equal('TM_ERR_TRACKING');
    expect(st.mirrors[0]!.error!.message).to.contain('tracking.mode reflink cannot work');
  });
});
