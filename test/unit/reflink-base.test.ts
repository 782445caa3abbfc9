import { expect } from 'chai';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { sha256File } from '../../src/util/sha256.js';
import { ReflinkBase } from '../../src/volume/reflink-base.js';
import { LoopFs } from '../helpers/xfs.js';

const MiB = 1024 * 1024;

describe('ReflinkBase (consistency: reflink) on a loop-mounted XFS', function () {
  this.timeout(120_000);
  let fs: LoopFs;
  let ext4: LoopFs;
  before(async () => {
    fs = await LoopFs.create('xfs', 512 * MiB);
    ext4 = await LoopFs.create('ext4', 256 * MiB);
  });
  after(async () => {
    await fs?.cleanup();
    await ext4?.cleanup();
  });

  async function target(dir: string): Promise<string> {
    const t = path.join(dir, 'target.img');
    await fsp.writeFile(t, Buffer.alloc(8 * MiB, 7));
    return t;
  }

  it('usable on XFS, not on ext4 (the reason names FICLONE) nor for a directory on another filesystem', async () => {
    const t = await target(fs.mount);
    expect(await ReflinkBase.usable(t, path.join(fs.mount, '.thinmirror', 'a'))).to.deep.equal({ ok: true });
    const e = await target(ext4.mount);
    const no = await ReflinkBase.usable(e, path.join(ext4.mount, '.thinmirror', 'a'));
    expect(no.ok).to.equal(false);
    expect((no as { reason: string }).reason).to.match(/FICLONE is not supported/);
    const other = await ReflinkBase.usable(t, path.join(ext4.mount, 'elsewhere'));
    expect((other as { reason: string }).reason).to.match(/not on the filesystem of/);
  });

  it('ensure clones the committed image once, rollback restores it exactly, drop and stale bases go', async () => {
    const dir = path.join(fs.mount, 'r1');
    await fsp.mkdir(dir);
    const t = await target(dir);
    const before = await sha256File(t);
    const b = new ReflinkBase(t, path.join(dir, '.thinmirror', 'vm1'));
    const first = await b.ensure(3);
    expect(first.cloned).to.equal(true);
    expect(path.basename(first.file)).to.equal('base-3.img');
    // A resumed generation keeps its base: the target is already partly written.
    const fh = await fsp.open(t, 'r+');
    await fh.write(Buffer.alloc(MiB, 9), 0, MiB, 2 * MiB);
    await fh.close();
    expect((await b.ensure(3)).cloned).to.equal(false);
    expect(await sha256File(first.file)).to.equal(before);
    expect(await b.rollback(3)).to.equal(3);
    expect(await sha256File(t)).to.equal(before);
    expect(await b.list()).to.deep.equal([]);
    // Idempotent: nothing left to restore.
    expect(await b.rollback(3)).to.equal(null);
    // A base older than the committed generation is stale; one newer cannot be explained.
    await b.ensure(4);
    await b.ensure(5);
    expect((await b.list()).map((x) => x.generation)).to.deep.equal([5]);
    const err = await b.ensure(2).catch((e) => e);
    expect(err.code).to.equal('TM_ERR_STATE');
    await b.drop();
    expect(await b.list()).to.deep.equal([]);
  });
});
