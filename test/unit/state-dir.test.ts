import { expect } from 'chai';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { prepareStateDir } from '../../src/daemon/state-dir.js';
import { pseudoFsName, pseudoFsOf } from '../../src/util/pseudo-fs.js';
import { rejection } from '../helpers/rejection.js';

describe('state-dir: node.stateDir is refused on a pseudo-filesystem', () => {
  let dir: string;
  beforeEach(async () => (dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tm-statedir-'))));
  afterEach(() => fsp.rm(dir, { recursive: true, force: true }));

  it('pseudoFsOf names proc and sysfs (the nearest existing ancestor of a missing path), null for a disk filesystem', async () => {
    expect(await pseudoFsOf('/proc')).to.equal('proc');
    expect(await pseudoFsOf('/proc/thinmirror/state')).to.equal('proc');
    expect(await pseudoFsOf('/proc/self/fd/no/such')).to.equal('proc');
    expect(await pseudoFsOf('/sys/kernel/thinmirror')).to.equal('sysfs');
    expect(await pseudoFsOf(dir)).to.equal(null);
    expect(await pseudoFsOf(path.join(dir, 'a', 'b'))).to.equal(null);
    expect(pseudoFsName(0x9fa0)).to.equal('proc');
    // f_type may come back negative where it is a signed 32-bit long.
    expect(pseudoFsName(0xf97cff8c | 0)).to.equal('selinuxfs');
    expect(pseudoFsName(0xef53)).to.equal(null); // ext4
  });

  it('prepareStateDir under /proc is TM_ERR_CONFIG naming node.stateDir and the filesystem (mkdir -p there loops forever)', async () => {
    for (const [p, fs] of [['/proc/thinmirror-test', 'proc'], ['/proc/self/thinmirror', 'proc'], ['/sys/kernel/thinmirror-test', 'sysfs']] as const) {
      const e = await rejection(prepareStateDir(p));
      expect(e.code, p).to.equal('TM_ERR_CONFIG');
      expect(e.message).to.contain(`node.stateDir ${p} is on ${fs}, a pseudo-filesystem`);
    }
  });

  it('prepareStateDir creates a missing directory with mode 0700, and takes an existing one', async () => {
    const p = path.join(dir, 'a', 'state');
    await prepareStateDir(p);
    expect((await fsp.stat(p)).mode & 0o777).to.equal(0o700);
    await prepareStateDir(p);
  });
});
