import { expect } from 'chai';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { DaemonProcess } from '../../src/cli/daemon-process.js';
import { createSampleVolume } from '../../src/util/sample.js';
import { Pair, sha256File } from '../helpers/pair.js';

const MiB = 1024 * 1024;

describe('integration: daemon lifecycle', function () {
  this.timeout(120_000);
  let pair: Pair;
  afterEach(async () => {
    await pair?.cleanup();
  });

  /** A pair in sync on a 64 MiB volume with 8 MiB allocated, detecting every 500 ms (set as `pair` first, so afterEach cleans up after a failure). */
  async function syncedPair(): Promise<Pair> {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 64 * MiB, allocated: 8 * MiB, extents: 4 });
    await pair.writeConfigs({ interval: '500ms' });
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    await pair.waitInSync(1);
    return pair;
  }

  it('SIGTERM exits 0 with state persisted; a restart resends nothing that was committed', async () => {
    pair = await syncedPair();
    expect(await pair.primary!.stop()).to.deep.equal({ code: 0, signal: null });
    expect(await pair.secondary!.stop()).to.deep.equal({ code: 0, signal: null });

    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const m = await pair.waitInSync(1);
    await new Promise((r) => setTimeout(r, 1500)); // a few detection passes
    const after = await pair.primaryMirror();
    expect(after.committedGeneration).to.equal(m.committedGeneration);
    expect(after.sentBytes, 'payload resent after a clean restart').to.equal(0);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
  });

  it('SIGTERM of both daemons in the middle of a sync: each exits 0 within 10 s, and the restart resends at most what was in flight', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 1024 * MiB, allocated: 256 * MiB, extents: 16, seed: 21, content: 'random' });
    await pair.writeConfigs({ interval: '1h' });
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const allocated = 256 * MiB;
    await pair.primary!.waitFor((s) => s.mirrors[0]!.sentBytes >= 0.3 * allocated, 120_000, '30% sent', 20);
    // DaemonProcess.stop sends SIGTERM and SIGKILLs after 10 s: exit code 0 without a signal is a clean stop within 10 s.
    expect(await pair.primary!.stop(10_000)).to.deep.equal({ code: 0, signal: null });
    const applied = (await pair.secondaryMirror()).appliedBytes;
    expect(applied, 'the stop came too late to test a resume').to.be.lessThan(0.9 * allocated);
    expect(await pair.secondary!.stop(10_000)).to.deep.equal({ code: 0, signal: null });

    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    await pair.waitInSync(1, 120_000);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
    // Payload the restarted primary sent beyond what the secondary had applied before the stop.
    const resent = (await pair.primaryMirror()).sentBytes - (allocated - applied);
    console.log(`      SIGTERM at ${((100 * applied) / allocated).toFixed(0)}%: ${(resent / MiB).toFixed(2)} MiB resent of ${allocated / MiB} MiB`);
    expect(resent, `resent ${resent} bytes after a clean stop`).to.be.at.most(16 * MiB); // maxInFlight
  });

  it("the secondary's volume replaced by a file of another size: refused with TM_ERR_SIZE_MISMATCH, the file untouched", async () => {
    pair = await syncedPair();
    expect(await pair.secondary!.stop()).to.deep.equal({ code: 0, signal: null });
    await fsp.rm(pair.target);
    await createSampleVolume(pair.target, { size: 48 * MiB, allocated: 2 * MiB, extents: 2, seed: 5 });
    const hash = await sha256File(pair.target);
    await pair.startSecondary().waitReady();
    const st = await pair.primary!.waitFor((s) => s.mirrors[0]!.error?.code === 'TM_ERR_SIZE_MISMATCH', 60_000, 'TM_ERR_SIZE_MISMATCH');
    expect(st.mirrors[0]!.error!.message).to.contain(pair.target);
    expect((await pair.secondaryMirror()).error?.code).to.equal('TM_ERR_SIZE_MISMATCH');
    expect((await fsp.stat(pair.target)).size).to.equal(48 * MiB);
    expect(await sha256File(pair.target)).to.equal(hash);
  });

  it('a second daemon on the same state directory exits 1 with TM_ERR_LOCKED naming the holder', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 16 * MiB, allocated: 1 * MiB, extents: 1 });
    await pair.writeConfigs();
    const first = pair.startSecondary();
    await first.waitReady();
    const second = new DaemonProcess(pair.cfg.secondary, pair.cfg.secondaryState, path.join(pair.dir, 'second.log'));
    const exit = await second.exited;
    expect(exit.code).to.equal(1);
    expect(second.logTail()).to.contain('TM_ERR_LOCKED').and.contain(`pid ${first.pid}`);
    expect(first.running).to.equal(true);
    await first.status(); // the first one still answers
  });

  it('a secondary that lost its state is detected and reconciled by digests: only the chunk that differs is sent', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 32 * MiB, allocated: 4 * MiB, extents: 4 });
    await pair.writeConfigs();
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    await pair.waitInSync(1);
    await pair.secondary!.stop();
    await fsp.rm(pair.cfg.secondaryState, { recursive: true });
    // Damage the replica too: a stale secondary must not be believed.
    const fh = await fsp.open(pair.target, 'r+');
    await fh.write(Buffer.alloc(65536, 0x77), 0, 65536, 0);
    await fh.close();
    await pair.startSecondary().waitReady();
    const st = await pair.primary!.waitFor(
      (s) => s.mirrors[0]!.committedGeneration >= 2 && s.mirrors[0]!.state === 'in-sync' && s.mirrors[0]!.reconcile?.finished === true,
      30_000,
      'the reconciliation',
    );
    const m = st.mirrors[0]!;
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
    expect(m.reconcile!.reason).to.contain('its state was lost');
    expect(m.reconcile!.differingBytes).to.equal(65536);
    expect(m.lastCycle!.changedBytes).to.equal(65536);
    // 16 bytes per chunk of digests one way, one chunk of data the other: far below the 4 MiB allocated.
    expect(m.lastCycle!.wireBytes).to.be.lessThan(256 * 1024);
    expect(pair.primary!.logTail(40)).not.to.contain('every chunk');
  });

  it('a primary whose state directory was deleted says so and reconciles by digests, not by copying everything', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 32 * MiB, allocated: 8 * MiB, extents: 4 });
    await pair.writeConfigs();
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    await pair.waitInSync(1);
    await pair.primary!.stop();
    await fsp.rm(pair.cfg.primaryState, { recursive: true });
    // Two chunks change while the primary is down and has no record of it.
    const fh = await fsp.open(pair.source, 'r+');
    await fh.write(Buffer.alloc(65536, 0x42), 0, 65536, 3 * 65536);
    await fh.write(Buffer.alloc(65536, 0x43), 0, 65536, 300 * 65536);
    await fh.close();
    await pair.startPrimary().waitReady();
    const st = await pair.primary!.waitFor((s) => s.mirrors[0]!.state === 'in-sync' && s.mirrors[0]!.reconcile?.finished === true, 30_000, 'the reconciliation');
    const m = st.mirrors[0]!;
    expect(m.reconcile!.reason).to.contain('no tracking state');
    expect(m.reconcile!.differingBytes).to.equal(2 * 65536);
    // The secondary's numbering goes on: generation 1 was committed before.
    expect(m.committedGeneration).to.equal(2);
    expect(m.sentBytes).to.equal(2 * 65536);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
    expect(pair.secondary!.logTail(40)).to.contain('adopting its volume id');
  });

  it('a primary with another volume id (not fresh) is refused with TM_ERR_IDENTITY_MISMATCH; the replica is untouched', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 16 * MiB, allocated: 2 * MiB, extents: 2 });
    await pair.writeConfigs();
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    await pair.waitInSync(1);
    await pair.primary!.stop();
    const stateFile = path.join(pair.cfg.primaryState, 'vm1', 'state.json');
    const state = JSON.parse(await fsp.readFile(stateFile, 'utf8')) as { volumeId: string };
    state.volumeId = 'ab'.repeat(16);
    await fsp.writeFile(stateFile, JSON.stringify(state));
    const fh = await fsp.open(pair.source, 'r+');
    await fh.write(Buffer.alloc(65536, 0x55), 0, 65536, 0);
    await fh.close();
    const before = await sha256File(pair.target);
    await pair.startPrimary().waitReady();
    const st = await pair.primary!.waitFor((s) => s.mirrors[0]!.error !== null, 20_000, 'the refusal');
    expect(st.mirrors[0]!.error!.code).to.equal('TM_ERR_IDENTITY_MISMATCH');
    expect(pair.secondary!.logTail(20)).to.contain('TM_ERR_IDENTITY_MISMATCH');
    expect(await sha256File(pair.target)).to.equal(before);
  });
});
