import { expect } from 'chai';
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { native, type NativeOps } from '../../src/native/index.js';
import { openVolume } from '../../src/volume/factory.js';
import { MemoryVolume } from '../../src/volume/memory.js';
import { SparseFileVolume } from '../../src/volume/sparse-file.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => null,
    (e: unknown) => e,
  );
}

describe('openVolume: the one place that picks the backend', () => {
  let dir: string;
  const names: string[] = [];
  let serial = 0;
  const uniqueName = () => {
    const n = `factory-${process.pid}-${serial++}`;
    names.push(n);
    return n;
  };
  before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-factory-'))));
  after(() => rmSync(dir, { recursive: true, force: true }));
  afterEach(() => {
    for (const n of names.splice(0)) MemoryVolume.unregister(n);
  });

  it('a path opens a SparseFileVolume (existing file, or created sparse with create)', async () => {
    const f = path.join(dir, 'a.img');
    writeFileSync(f, Buffer.alloc(3 * 4096, 2));
    const v = await openVolume(f);
    try {
      expect(v).to.be.instanceOf(SparseFileVolume);
      expect(v).to.include({ kind: 'file', path: f, size: 3 * 4096 });
      expect((await v.read(4096, 2)).equals(Buffer.from([2, 2]))).to.equal(true);
    } finally {
      await v.close();
    }
    const g = path.join(dir, 'b.img');
    const w = await openVolume(g, { create: { size: 2 * MiB } });
    try {
      expect(w.size).to.equal(2 * MiB);
      expect(statSync(g).size).to.equal(2 * MiB);
      expect(await w.allocated()).to.deep.equal([]);
    } finally {
      await w.close();
    }
    // Read-only is passed on.
    const ro = await openVolume(f, { readOnly: true });
    try {
      expect(await rejection(ro.write(0, Buffer.alloc(1)))).to.have.property('code', 'TM_ERR_VOLUME_IO');
    } finally {
      await ro.close();
    }
  });

  it('a missing file is TM_ERR_VOLUME_IO naming it; the native ops are passed on', async () => {
    const missing = path.join(dir, 'nope.img');
    const e = await rejection(openVolume(missing));
    expect(e).to.have.property('code', 'TM_ERR_VOLUME_IO');
    expect((e as Error).message).to.contain(missing);
    const calls: string[] = [];
    const ops: NativeOps = {
      ...native(),
      punchHole: async () => {
        calls.push('punch');
        throw Object.assign(new Error('not here'), { code: 'EOPNOTSUPP' });
      },
    };
    const v = await openVolume(path.join(dir, 'c.img'), { create: { size: 1 * MiB }, ops });
    try {
      await v.zero(0, 4096);
      expect(calls).to.deep.equal(['punch']);
      expect(v.capabilities.punchHole).to.equal(false);
    } finally {
      await v.close();
    }
  });

  it('memory:NAME is a new handle on the registered volume: same data, its own closed and read-only flags', async () => {
    const name = uniqueName();
    const mine = MemoryVolume.create(64 * KiB, { path: `memory:${name}` });
    MemoryVolume.register(name, mine);
    const v = await openVolume(`memory:${name}`);
    expect(v).to.be.instanceOf(MemoryVolume);
    expect(v).to.not.equal(mine);
    expect(v).to.include({ kind: 'memory', path: `memory:${name}`, size: 64 * KiB });
    await v.write(8192, Buffer.from('via the factory'));
    await v.close();
    expect((await mine.read(8192, 15)).toString()).to.equal('via the factory');
    const ro = await openVolume(`memory:${name}`, { readOnly: true });
    expect(await rejection(ro.write(0, Buffer.alloc(1)))).to.have.property('code', 'TM_ERR_VOLUME_IO');
    expect((await ro.read(8192, 3)).toString()).to.equal('via');
    // create is ignored when the name is registered (as for an existing file).
    const again = await openVolume(`memory:${name}`, { create: { size: 1 } });
    expect(again.size).to.equal(64 * KiB);
  });

  it('memory:NAME with create and nothing registered registers a new all-hole volume of that size', async () => {
    const name = uniqueName();
    const v = await openVolume(`memory:${name}`, { create: { size: 5 * MiB + 3 } });
    expect(v.size).to.equal(5 * MiB + 3);
    expect(await v.allocated()).to.deep.equal([]);
    await v.write(5 * MiB, Buffer.from('end'));
    await v.close();
    const registered = MemoryVolume.lookup(name);
    expect(registered).to.be.instanceOf(MemoryVolume);
    expect((await registered!.read(5 * MiB, 3)).toString()).to.equal('end');
  });

  it('memory:NAME not registered and without create (or read-only) is TM_ERR_VOLUME_IO naming it', async () => {
    const name = uniqueName();
    for (const o of [{}, { readOnly: true, create: { size: 4096 } }]) {
      const e = await rejection(openVolume(`memory:${name}`, o));
      expect(e).to.have.property('code', 'TM_ERR_VOLUME_IO');
      expect((e as Error).message).to.contain(`memory:${name}`);
    }
    expect(MemoryVolume.lookup(name)).to.equal(undefined);
    expect(await rejection(openVolume('memory:'))).to.have.property('code', 'TM_ERR_VOLUME_IO');
  });
});
