import { expect } from 'chai';
import { existsSync, promises as fsp, readFileSync } from 'node:fs';
import { createSampleVolume, prng, textLike } from '../../src/util/sample.js';
import { SparseFileVolume } from '../../src/volume/sparse-file.js';
import { testKeyText } from '../helpers/config.js';
import { allocatedBytes, Pair, sha256File } from '../helpers/pair.js';

const MiB = 1024 * 1024;
const CHUNK = 64 * 1024;

describe('integration: sparse file to sparse file, two daemons on loopback', function () {
  this.timeout(180_000);
  let pair: Pair;
  afterEach(async () => {
    await pair?.cleanup();
  });

  it('initial sync sends only allocated chunks; target byte-identical and thin; status fields', async () => {
    pair = await Pair.create();
    const size = 256 * MiB + 12345; // not a multiple of the chunk size
    const ranges = await createSampleVolume(pair.source, { size, allocated: 32 * MiB, extents: 24, seed: 3, content: 'text' });
    // An allocated range of zeros inside the data, and data in the partial tail chunk.
    const fh = await fsp.open(pair.source, 'r+');
    await fh.write(Buffer.alloc(256 * 1024), 0, 256 * 1024, 100 * MiB);
    await fh.write(Buffer.from('tail bytes of the volume'), 0, 24, size - 24);
    await fh.close();
    await pair.writeConfigs();
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const m = await pair.waitInSync(1);

    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
    expect((await fsp.stat(pair.target)).size).to.equal(size);
    const srcAlloc = allocatedBytes(pair.source);
    const extents = ranges.length + 2;
    expect(allocatedBytes(pair.target)).to.be.at.most(srcAlloc + extents * CHUNK);
    // Only allocated, non-zero chunks travel as data: at most the chunk-aligned allocation.
    expect(m.sentBytes).to.be.greaterThan(30 * MiB);
    expect(m.sentBytes).to.be.at.most(srcAlloc + extents * CHUNK);
    expect(m.wireBytes).to.be.lessThan(m.sentBytes * 0.6); // text-like data compresses
    for (const k of ['name', 'role', 'state', 'volumeBytes', 'allocatedBytes', 'sentBytes', 'wireBytes', 'dirtyBytes', 'committedGeneration', 'lagSeconds', 'error']) {
      expect(m).to.have.property(k);
    }
    expect(m).to.include({ name: 'vm1', role: 'primary', state: 'in-sync', volumeBytes: size, dirtyBytes: 0, error: null });
    // The replica's age (issue 15): never 0, the volume may have been written since the view was taken.
    expect(m.lagSeconds).to.be.a('number').and.greaterThan(0);
    const s = await pair.secondaryMirror();
    expect(s).to.include({ role: 'secondary', committedGeneration: 1, error: null });
    expect(s.lagSeconds).to.be.a('number').and.greaterThan(0);
  });

  it('changes, new extents and a punched hole reach the secondary as new generations', async () => {
    pair = await Pair.create();
    const size = 128 * MiB;
    await createSampleVolume(pair.source, { size, allocated: 16 * MiB, extents: 8, seed: 5 });
    await pair.writeConfigs({ interval: '1s' });
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    await pair.waitInSync(1);
    const before = allocatedBytes(pair.target);

    const rnd = prng(11);
    const vol = await SparseFileVolume.open(pair.source);
    await vol.write(3 * MiB + 4096, textLike(100_000, rnd)); // change inside or near an extent
    await vol.write(120 * MiB, textLike(2 * MiB, rnd)); // a new extent in a hole
    const alloc = await vol.allocated(CHUNK);
    const victim = alloc[2]!;
    await vol.zero(victim.offset, victim.length); // punch a whole extent
    await vol.flush();
    await vol.close();

    await pair.waitConverged();
    const m = await pair.primaryMirror();
    expect(m.committedGeneration).to.be.at.least(2);
    expect(m.lastCycle).to.not.equal(null);
    expect(m.lastCycle!.changedBytes).to.be.lessThan(16 * MiB); // not a full resend
    // The punched extent is a hole on the target again (thin stays thin).
    const holeVol = await SparseFileVolume.open(pair.target, { readOnly: true });
    const talloc = await holeVol.allocated();
    await holeVol.close();
    const overlap = talloc.some((r) => r.offset < victim.offset + victim.length && victim.offset < r.offset + r.length);
    expect(overlap, 'punched range still allocated on the target').to.equal(false);
    expect(allocatedBytes(pair.target)).to.be.at.most(before + 2 * MiB + 2 * CHUNK);
  });

  it('kill -9 of the primary in the middle of the sync resumes, not restarts (resent < 25%)', async () => {
    pair = await Pair.create();
    const size = 2048 * MiB;
    await createSampleVolume(pair.source, { size, allocated: 512 * MiB, extents: 32, seed: 9, content: 'random' });
    await pair.writeConfigs();
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const allocated = allocatedBytes(pair.source);
    await pair.primary!.waitFor((s) => s.mirrors[0]!.sentBytes >= 0.35 * allocated, 120_000, '35% sent', 20);
    pair.primary!.kill('SIGKILL');
    await pair.primary!.exited;
    const applied = (await pair.secondaryMirror()).appliedBytes;
    expect(applied, 'the kill came too late to test a resume').to.be.lessThan(0.9 * allocated);

    pair.startPrimary();
    const m = await pair.waitInSync(1, 120_000);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
    // The secondary counts every payload byte it applied over its lifetime: the
    // excess over the allocated data is what the restart sent again.
    const totalApplied = (await pair.secondaryMirror()).appliedBytes;
    const resent = totalApplied - allocated;
    expect(resent / allocated).to.be.lessThan(0.25);
    expect(m.sentBytes).to.be.lessThan(allocated); // the restarted primary did not start over
  });

  it('kill -9 of the secondary in the middle of the sync resumes, not restarts (resent < 25%)', async () => {
    pair = await Pair.create();
    const size = 2048 * MiB;
    await createSampleVolume(pair.source, { size, allocated: 512 * MiB, extents: 32, seed: 13, content: 'random' });
    await pair.writeConfigs({ extraPrimary: { reconnect: { min: '200ms', max: '1s' } } });
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const allocated = allocatedBytes(pair.source);
    await pair.primary!.waitFor((s) => s.mirrors[0]!.sentBytes >= 0.35 * allocated, 120_000, '35% sent', 20);
    pair.secondary!.kill('SIGKILL');
    await pair.secondary!.exited;
    const sentBefore = (await pair.primaryMirror()).sentBytes;
    expect(sentBefore, 'the kill came too late to test a resume').to.be.lessThan(0.9 * allocated);
    await pair.primary!.waitFor((s) => s.mirrors[0]!.state === 'error', 30_000, 'the primary to notice');

    await pair.startSecondary().waitReady();
    const m = await pair.waitInSync(1, 120_000);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
    const resent = m.sentBytes - allocated;
    expect(resent / allocated).to.be.lessThan(0.25);
  });

  it('a wrong pre-shared key is refused with a coded error on both sides; nothing is written', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 16 * MiB, allocated: 2 * MiB, extents: 2 });
    await pair.writeConfigs();
    // The primary gets another key than the secondary.
    const otherKey = `${pair.dir}/psk-other`;
    await fsp.writeFile(otherKey, testKeyText('another key'), { mode: 0o600 });
    const yaml = readFileSync(pair.cfg.primary, 'utf8').replace(/pskFile: .*/, `pskFile: ${otherKey}`);
    await fsp.writeFile(pair.cfg.primary, yaml);
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const st = await pair.primary!.waitFor((s) => s.mirrors[0]!.error !== null, 20_000, 'a refusal');
    expect(st.mirrors[0]!.error!.code).to.equal('TM_ERR_AUTH_FAILED');
    expect(st.mirrors[0]!.state).to.equal('error');
    await new Promise((r) => setTimeout(r, 500));
    expect(pair.secondary!.logTail(50)).to.contain('TM_ERR_AUTH_FAILED');
    expect(existsSync(pair.target), 'target must not be created').to.equal(false);
  });

  it('a target of another size is refused (TM_ERR_SIZE_MISMATCH) and left untouched', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 32 * MiB, allocated: 4 * MiB, extents: 4 });
    await createSampleVolume(pair.target, { size: 16 * MiB, allocated: 1 * MiB, extents: 1, seed: 77 });
    const targetHash = await sha256File(pair.target);
    await pair.writeConfigs();
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const st = await pair.primary!.waitFor((s) => s.mirrors[0]!.error !== null, 20_000, 'a refusal');
    expect(st.mirrors[0]!.error!.code).to.equal('TM_ERR_SIZE_MISMATCH');
    const sec = await pair.secondaryMirror();
    expect(sec.error?.code).to.equal('TM_ERR_SIZE_MISMATCH');
    expect((await fsp.stat(pair.target)).size).to.equal(16 * MiB);
    expect(await sha256File(pair.target)).to.equal(targetHash);
  });

  it('an unknown mirror name is refused with TM_ERR_UNKNOWN_MIRROR', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 16 * MiB, allocated: 1 * MiB, extents: 1 });
    await pair.writeConfigs();
    const yaml = readFileSync(pair.cfg.secondary, 'utf8').replace('name: vm1', 'name: other');
    await fsp.writeFile(pair.cfg.secondary, yaml);
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const st = await pair.primary!.waitFor((s) => s.mirrors[0]!.error !== null, 20_000, 'a refusal');
    expect(st.mirrors[0]!.error!.code).to.equal('TM_ERR_UNKNOWN_MIRROR');
    expect(existsSync(pair.target)).to.equal(false);
  });

  it('a chunk size that differs between the two configs is refused (TM_ERR_CHUNK_SIZE_MISMATCH)', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 16 * MiB, allocated: 1 * MiB, extents: 1 });
    await pair.writeConfigs({ chunkSize: '128KiB' }); // the secondary keeps the default 64KiB
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const st = await pair.primary!.waitFor((s) => s.mirrors[0]!.error !== null, 20_000, 'a refusal');
    expect(st.mirrors[0]!.error!.code).to.equal('TM_ERR_CHUNK_SIZE_MISMATCH');
    expect((await pair.secondaryMirror()).error?.code).to.equal('TM_ERR_CHUNK_SIZE_MISMATCH');
    expect(existsSync(pair.target), 'nothing written before the refusal').to.equal(false);
  });
});
