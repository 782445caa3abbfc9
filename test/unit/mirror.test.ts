import { expect } from 'chai';
import fc from 'fast-check';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { prng, textLike } from '../../src/util/sample.js';
import { sameContent, type MemoryVolume } from '../../src/volume/memory.js';
import { totalBytes } from '../../src/volume/volume.js';
import { MemoryMirrorPair } from '../helpers/mirror-pair.js';
import { pino } from 'pino';
import { rollbackStopped } from '../../src/mirror/rollback.js';

const FIXTURES = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'state-format1');
const KiB = 1024;
const MiB = 1024 * KiB;

/** Text-like data (lz4 compresses it), zero runs that are allocated, and holes; `size` need not be a multiple of the chunk. */
async function fill(v: MemoryVolume, seed: number, extents = 12): Promise<void> {
  const rnd = prng(seed);
  for (let i = 0; i < extents; i++) {
    const len = (1 + Math.floor(rnd() * 24)) * 4 * KiB + Math.floor(rnd() * 3000);
    const off = Math.floor(rnd() * (v.size - len));
    await v.write(off, i % 4 === 3 ? Buffer.alloc(len) : textLike(len, rnd));
  }
  // The short tail chunk.
  await v.write(v.size - 100, textLike(100, rnd));
}

async function expectSame(pair: MemoryMirrorPair): Promise<void> {
  expect(await sameContent(pair.source, pair.target), 'source and target have the same bytes').to.equal(true);
}

describe('mirror engine over MemoryVolumes and in-memory sessions (no processes)', function () {
  this.timeout(60_000);
  let pair: MemoryMirrorPair;
  afterEach(async () => {
    await pair?.cleanup();
  });

  it('initial sync: the target gets the same bytes, holes stay holes, zero runs become holes', async () => {
    pair = await MemoryMirrorPair.create(3 * MiB + 100);
    await fill(pair.source, 1);
    await pair.startSecondary();
    await pair.startPrimary();
    const st = await pair.waitCommitted(1);
    await expectSame(pair);
    // Allocated zeros travel as zero extents and become holes: the target is thinner than the source.
    const src = totalBytes(await pair.source.allocated());
    const dst = totalBytes(await pair.target.allocated());
    expect(dst).to.be.greaterThan(0);
    expect(dst).to.be.lessThan(src);
    expect(st.sentBytes, 'only non-zero allocated chunks travel as data').to.be.at.most(src);
    expect(st.lastCycle?.generation).to.equal(1);
    const sec = await pair.secondary!.status();
    expect(sec).to.include({ role: 'secondary', committedGeneration: 1, sentBytes: 0 });
    expect(sec.appliedBytes).to.equal(st.sentBytes);
  });

  it('changes and punched holes arrive as the next generation; an unchanged volume makes none', async () => {
    pair = await MemoryMirrorPair.create(2 * MiB);
    await fill(pair.source, 2);
    await pair.startSecondary();
    await pair.startPrimary();
    await pair.waitCommitted(1);
    const rnd = prng(3);
    await pair.source.write(100 * KiB, textLike(40 * KiB, rnd));
    const alloc = await pair.source.allocated(4096);
    const victim = alloc[alloc.length - 1]!;
    await pair.source.zero(victim.offset, victim.length);
    const st = await pair.waitCommitted(2);
    await expectSame(pair);
    expect(st.lastCycle!.changedBytes).to.be.at.least(40 * KiB);
    // Several detection passes later nothing new was created.
    await new Promise((r) => setTimeout(r, 150));
    expect((await pair.primary!.status()).generation).to.equal(2);
  });

  it('issue 15: both sides count the lag from the committed generation\'s view, kept in both state files; passes that find nothing move it on', async () => {
    pair = await MemoryMirrorPair.create(2 * MiB);
    await fill(pair.source, 4);
    await pair.startSecondary();
    await pair.startPrimary();
    await pair.waitCommitted(1);
    const a1 = await pair.stateOnDisk('a');
    const b1 = await pair.stateOnDisk('b');
    expect(a1.committedViewAt).to.be.a('number');
    expect(b1.committedViewAt, 'the secondary has it from begin.viewAt').to.equal(a1.committedViewAt);
    expect(a1.pendingViewAt ?? null).to.equal(null);
    expect(b1.applyingViewAt ?? null).to.equal(null);
    const before = Date.now();
    await pair.source.write(100 * KiB, textLike(8 * KiB, prng(5)));
    await pair.waitCommitted(2);
    const a2 = await pair.stateOnDisk('a');
    expect(a2.committedViewAt, 'the view of generation 2 was taken after the write').to.be.at.least(before);
    expect((await pair.stateOnDisk('b')).committedViewAt).to.equal(a2.committedViewAt);
    // Idle: detection passes (every 20 ms) find nothing; each moves the view time on, on both sides, without a save.
    await new Promise((r) => setTimeout(r, 200));
    const now = Date.now();
    const p = await pair.primary!.status();
    const q = await pair.secondary!.status();
    expect(p.generation).to.equal(2);
    expect(now - p.lagSeconds! * 1000).to.be.greaterThan(a2.committedViewAt!);
    expect(now - q.lagSeconds! * 1000).to.be.greaterThan(a2.committedViewAt!);
    expect((await pair.stateOnDisk('a')).committedViewAt).to.equal(a2.committedViewAt);
  });

  it('resumes at every cursor: the link cut at each frame index of an initial sync converges', async () => {
    // How many frames does a clean initial sync take? No detection pass after it (the
    // interval is long): an idle pass would send `unchanged` frames, counted here too.
    const sides = { secondary: { checkpointBytes: 64 * KiB }, primary: { tracking: { mode: 'scan' as const, interval: 3600 } } };
    pair = await MemoryMirrorPair.create(1 * MiB + 5000, sides);
    await fill(pair.source, 4, 6);
    await pair.startSecondary();
    await pair.startPrimary();
    await pair.waitCommitted(1);
    const frames = pair.framesSeen;
    await pair.cleanup();
    expect(frames).to.be.greaterThan(20);
    for (let k = 0; k < frames; k++) {
      pair = await MemoryMirrorPair.create(1 * MiB + 5000, sides);
      await fill(pair.source, 4, 6);
      let cut = false;
      pair.onFrame = (i) => (i === k && !cut ? ((cut = true), 'cut') : 'pass');
      await pair.startSecondary();
      await pair.startPrimary();
      const st = await pair.waitCommitted(1);
      expect(cut, `frame ${k} was reached`).to.equal(true);
      await expectSame(pair);
      // Frames 0-3 are the handshake (hello, challenge, auth, ready): a cut there leaves one established session.
      expect(st.sessions, `cut at frame ${k}`).to.equal(k < 4 ? 1 : 2);
      await pair.cleanup();
    }
  });

  it('scattered small changes travel together (data extents with runs): a frame per batch, not per piece; zero chunks among them stay zero extents; a cut at every frame of that generation converges', async () => {
    const size = 2 * MiB + 100;
    /** 150 changed chunks, every third one (8 KiB apart), three of them all zeros, and the tail. */
    const scatter = async (v: MemoryVolume) => {
      const rnd = prng(77);
      for (let i = 0; i < 150; i++) await v.write(3 * i * 4 * KiB + 64 * KiB, i % 50 === 7 ? Buffer.alloc(4 * KiB) : textLike(4 * KiB, rnd));
      await v.write(size - 100, textLike(100, rnd));
    };
    // Frames from the primary during generation 2, without faults.
    pair = await MemoryMirrorPair.create(size);
    await pair.source.write(0, textLike(size, prng(76)));
    await pair.startSecondary();
    await pair.startPrimary();
    await pair.waitCommitted(1);
    const first = pair.framesSeen;
    let fromPrimary = 0;
    pair.onFrame = (_i, from) => ((fromPrimary += from === 'a' ? 1 : 0), 'pass');
    await scatter(pair.source);
    const st = await pair.waitCommitted(2);
    await expectSame(pair);
    const gen2Frames = pair.framesSeen - first;
    // One extent per piece would be 148 data frames and 3 zero frames.
    expect(st.lastCycle!.changedBytes).to.be.at.least(150 * 4 * KiB);
    expect(fromPrimary, 'begin, a few extents with runs, the zero extents and commit').to.be.within(5, 20);
    await pair.cleanup();
    for (let k = 0; k < gen2Frames; k++) {
      pair = await MemoryMirrorPair.create(size, { secondary: { checkpointBytes: 64 * KiB } });
      await pair.source.write(0, textLike(size, prng(76)));
      await pair.startSecondary();
      await pair.startPrimary();
      await pair.waitCommitted(1);
      const at = pair.framesSeen + k;
      let cut = false;
      pair.onFrame = (i) => (i === at && !cut ? ((cut = true), 'cut') : 'pass');
      await scatter(pair.source);
      await pair.waitCommitted(2);
      await expectSame(pair);
      await pair.cleanup();
      // Acks are cumulative, so how many travel varies by a few from run to run.
      if (!cut) {
        expect(k, `frame ${k} of generation 2 was not reached`).to.be.at.least(gen2Frames - 6);
        break;
      }
    }
  });

  it('lost tracking state on the primary is reconciled by digests: only what differs is sent', async () => {
    pair = await MemoryMirrorPair.create(2 * MiB);
    await fill(pair.source, 5);
    await pair.startSecondary();
    await pair.startPrimary();
    const first = await pair.waitCommitted(1);
    await pair.primary!.stop();
    pair.primary = null;
    await fsp.rm(pair.primaryState, { recursive: true, force: true });
    await pair.source.write(512 * KiB, textLike(8 * KiB, prng(6)));
    await pair.startPrimary();
    const st = await pair.waitPrimary((s) => s.reconcile?.finished === true && s.state === 'in-sync', 'the reconciliation');
    await expectSame(pair);
    expect(st.reconcile!.reason).to.match(/no tracking state/);
    expect(st.reconcile!.differingBytes).to.equal(8 * KiB);
    expect(st.sentBytes).to.equal(8 * KiB);
    expect(st.committedGeneration).to.equal(first.committedGeneration + 1);
  });

  it('a secondary holding another volume refuses a primary that is not fresh (TM_ERR_IDENTITY_MISMATCH), and nothing is written', async () => {
    pair = await MemoryMirrorPair.create(1 * MiB);
    await fill(pair.source, 7);
    await pair.startSecondary();
    await pair.startPrimary();
    await pair.waitCommitted(1);
    await pair.primary!.stop();
    pair.primary = null;
    // Another volume id with history of its own: not fresh.
    const file = path.join(pair.primaryState, 'vm1', 'state.json');
    const s = JSON.parse(await fsp.readFile(file, 'utf8'));
    await fsp.writeFile(file, JSON.stringify({ ...s, volumeId: 'ffff' }));
    await pair.source.write(0, textLike(64 * KiB, prng(8)));
    const before = pair.target.clone();
    await pair.startPrimary();
    const st = await pair.waitPrimary((x) => x.error !== null, 'the refusal');
    expect(st.error!.code).to.equal('TM_ERR_IDENTITY_MISMATCH');
    expect(await sameContent(before, pair.target)).to.equal(true);
  });

  it('a format-1 state pair written by 0.1.0 mid-sync resumes from the secondary cursor after migration', async () => {
    const size = 256 * MiB;
    pair = await MemoryMirrorPair.create(size, { primary: { chunkSize: 64 * KiB, maxExtent: 1 * MiB, maxInFlight: 16 * MiB }, secondary: { chunkSize: 64 * KiB } });
    for (const [from, to] of [
      ['primary', pair.primaryState],
      ['secondary', pair.secondaryState],
    ] as const) {
      await fsp.mkdir(path.join(to, 'vm1'), { recursive: true });
      for (const f of await fsp.readdir(path.join(FIXTURES, from))) await fsp.copyFile(path.join(FIXTURES, from, f), path.join(to, 'vm1', f));
    }
    const cursor = JSON.parse(await fsp.readFile(path.join(FIXTURES, 'secondary', 'state.json'), 'utf8')).applying.cursor as number;
    // The data of the fixture's source (random, 8 MiB at 0, 37, 90, 150 and 200 MiB) is not kept;
    // any content will do, with the target holding what the fixture says is applied below the cursor.
    const rnd = prng(9);
    for (const at of [0, 37, 90, 150, 200]) await pair.source.write(at * MiB, textLike(8 * MiB, rnd));
    await pair.target.write(0, await pair.source.read(0, cursor));
    await pair.startSecondary();
    await pair.startPrimary();
    const st = await pair.waitCommitted(1, 30_000);
    await expectSame(pair);
    // Only what lies above the cursor travelled: 8 MiB at 90, 150 and 200 MiB (the 8 MiB at 37 MiB is partly below it).
    const above = 3 * 8 * MiB + (37 * MiB + 8 * MiB - cursor);
    expect(st.sentBytes).to.equal(above);
    const migrated = JSON.parse(await fsp.readFile(path.join(pair.secondaryState, 'vm1', 'state.json'), 'utf8'));
    expect(migrated).to.include({ format: 2, role: 'secondary', committedGeneration: 1 });
  });

  describe('a failed save never leaves the state in memory ahead of state.json (save then swap)', () => {
    /** Generation 1 committed, then a change that makes generation 2. */
    async function inSyncThenChanged(seed: number): Promise<void> {
      pair = await MemoryMirrorPair.create(2 * MiB);
      await fill(pair.source, seed);
      await pair.startSecondary();
      await pair.startPrimary();
      await pair.waitCommitted(1);
      await pair.source.write(300 * KiB, textLike(48 * KiB, prng(seed + 1)));
    }

    it('secondary: a commit whose save fails is not announced to the next session; the primary resends the generation', async () => {
      await inSyncThenChanged(21);
      pair.saveFaults.b = (next) => next.committedGeneration === 2;
      // Until three more sessions were refused by the failing commit save, or the primary (wrongly) took generation 2 as committed.
      await pair.waitFor(
        () => pair.primary,
        (p) => p.committedGeneration >= 2 || pair.savesFailed >= 3,
        'three failed commit saves on the secondary',
      );
      const sec = await pair.secondary!.status();
      expect(sec.committedGeneration, 'the secondary reports what is on disk').to.equal(1);
      expect(sec.error?.code).to.equal('TM_ERR_STATE');
      expect((await pair.stateOnDisk('b')).committedGeneration).to.equal(1);
      expect((await pair.primary!.status()).committedGeneration, 'no session was told generation 2 is committed').to.equal(1);
      expect((await pair.stateOnDisk('a')).pending).to.equal(2);
      // The disk works again: generation 2 is resent from the durable cursor and committed.
      pair.saveFaults.b = null;
      await pair.waitCommitted(2);
      await expectSame(pair);
      expect(await pair.stateOnDisk('b')).to.deep.include({ committedGeneration: 2, applying: null });
      expect((await pair.secondary!.status()).committedGeneration).to.equal(2);
    });

    it('primary: a commit whose save fails leaves generation 2 pending in memory as on disk, and is made again on the next session', async () => {
      await inSyncThenChanged(31);
      pair.saveFaults.a = (next) => next.committedGeneration === 2;
      await pair.waitFor(
        () => pair.primary,
        (p) => p.committedGeneration >= 2 || pair.savesFailed >= 3,
        'three failed commit saves on the primary',
      );
      const st = await pair.primary!.status();
      expect(st.committedGeneration, 'status shows what is on disk').to.equal(1);
      expect(st.error?.code).to.equal('TM_ERR_STATE');
      expect(await pair.stateOnDisk('a')).to.deep.include({ committedGeneration: 1, pending: 2 });
      pair.saveFaults.a = null;
      await pair.waitCommitted(2);
      expect(await pair.stateOnDisk('a')).to.deep.include({ committedGeneration: 2, pending: null });
      await expectSame(pair);
    });

    it('the state a role sees is frozen: a change in place fails (throws in strict code) instead of running ahead of the file', async () => {
      pair = await MemoryMirrorPair.create(256 * KiB);
      await pair.startSecondary();
      await pair.startPrimary();
      await pair.waitCommitted(1);
      const status = await pair.primary!.status();
      expect(status.committedGeneration).to.equal(1);
      const state = (pair.primary as unknown as { state: { committedGeneration: number } }).state;
      expect(Object.isFrozen(state)).to.equal(true);
      expect(Reflect.set(state, 'committedGeneration', 9)).to.equal(false);
      expect(state.committedGeneration).to.equal(1);
    });
  });

  describe('consistency: journal (undo journal on a MemoryVolume target) and rollback', () => {
    /** Sync generation 1, then cut the link for good in the middle of generation 2 and stop both sides. Returns the image of generation 1. */
    async function tornSecondGeneration(): Promise<MemoryVolume> {
      pair = await MemoryMirrorPair.create(2 * MiB, { secondary: { checkpointBytes: 64 * KiB } });
      await fill(pair.source, 21);
      // Generation 2 overwrites data in the first MiB (journaled as data) and holes in the second (saved as holes at begin).
      await pair.source.write(0, textLike(MiB, prng(20)));
      await pair.startSecondary();
      await pair.startPrimary();
      await pair.waitCommitted(1);
      const image1 = pair.target.clone();
      const rnd = prng(22);
      for (let i = 0; i < 16; i++) await pair.source.write(i * 128 * KiB, textLike(64 * KiB, rnd));
      await pair.source.zero(1536 * KiB, 256 * KiB);
      const from = pair.framesSeen;
      let cut = false;
      // Cut among the primary's frames (begin, then extents): the commit never reaches the secondary,
      // however many extents it applies at once.
      let fromPrimary = 0;
      pair.onFrame = (i, side) => (i >= from && side === 'a' && ++fromPrimary >= 16 ? ((cut = true), 'cut') : 'pass');
      await pair.waitPrimary(() => cut, 'the cut in generation 2');
      await pair.secondary!.abort();
      await pair.primary!.abort();
      pair.onFrame = null;
      const st = JSON.parse(await fsp.readFile(path.join(pair.secondaryState, 'vm1', 'state.json'), 'utf8'));
      expect(st.committedGeneration).to.equal(1);
      expect(st.applying?.generation, 'generation 2 was partly applied').to.equal(2);
      expect(await sameContent(image1, pair.target), 'the target is torn').to.equal(false);
      return image1;
    }

    it('status names the mode; rollback of a stopped secondary restores generation 1 exactly, and a second run changes nothing', async () => {
      const image1 = await tornSecondGeneration();
      const log = pino({ level: 'silent' });
      const c = pair.configs.secondary;
      const r = await rollbackStopped(c, pair.secondaryState, log);
      expect(r).to.include({ committedGeneration: 1, undone: 2, mode: 'journal' });
      expect(r.bytes).to.be.greaterThan(0);
      expect(await sameContent(image1, pair.target), 'generation 1 restored').to.equal(true);
      const again = await rollbackStopped(c, pair.secondaryState, log);
      expect(again).to.include({ undone: null, mode: null });
      expect(await sameContent(image1, pair.target)).to.equal(true);
      // Replication picks up from generation 1 and converges.
      const sec = await pair.startSecondary();
      expect((await sec.status()).consistency).to.deep.include({ mode: null, consistentGeneration: 1 });
      await pair.startPrimary();
      await pair.waitCommitted(2);
      await expectSame(pair);
      expect((await sec.status()).consistency).to.deep.include({ mode: 'journal', consistentGeneration: 2 });
    });

    it('a rollback killed after recording the state is completed by the next start of the secondary', async () => {
      const image1 = await tornSecondGeneration();
      // The first write back fails, as a kill would stop it: the state already says nothing is applied.
      pair.target.failNext('write', Object.assign(new Error('killed'), { code: 'EIO' }));
      const err = await rollbackStopped(pair.configs.secondary, pair.secondaryState, pino({ level: 'silent' })).catch((e) => e);
      expect(err.code).to.equal('TM_ERR_VOLUME_IO');
      const st = JSON.parse(await fsp.readFile(path.join(pair.secondaryState, 'vm1', 'state.json'), 'utf8'));
      expect(st.applying).to.equal(null);
      await pair.startSecondary();
      expect(await sameContent(image1, pair.target), 'the start completed the rollback').to.equal(true);
    });

    it('with consistency: off a torn generation cannot be rolled back (TM_ERR_CONSISTENCY) and status says the replica is not consistent', async () => {
      pair = await MemoryMirrorPair.create(2 * MiB, { secondary: { checkpointBytes: 64 * KiB, consistency: 'off' } });
      await fill(pair.source, 23);
      let cut = false;
      pair.onFrame = (i) => (i >= 30 ? ((cut = true), 'cut') : 'pass');
      await pair.startSecondary();
      await pair.startPrimary();
      await pair.waitPrimary(() => cut, 'the cut');
      // The cut counts frames sent; status shows generation 1 as being applied once its begin is saved (save then swap).
      const st = await pair.waitFor(() => pair.secondary, (s) => s.generation === 1, 'generation 1 recorded as being applied');
      expect(st.committedGeneration).to.equal(0);
      expect(st.consistency).to.deep.include({ mode: 'off', consistentGeneration: null });
      await pair.secondary!.abort();
      await pair.primary!.abort();
      const err = await rollbackStopped(pair.configs.secondary, pair.secondaryState, pino({ level: 'silent' })).catch((e) => e);
      expect(err.code).to.equal('TM_ERR_CONSISTENCY');
    });
  });

  describe('role changes (Mirror.changeRole)', () => {
    it('a primary becomes secondary: the sender stops, the state says secondary, sessions are taken', async () => {
      pair = await MemoryMirrorPair.create(1 * MiB);
      await fill(pair.source, 10);
      await pair.startSecondary();
      await pair.startPrimary();
      await pair.waitCommitted(1);
      const m = pair.primary!;
      await m.changeRole('secondary');
      expect(m.role).to.equal('secondary');
      const st = await m.status();
      expect(st).to.include({ role: 'secondary', committedGeneration: 1 });
      const onDisk = JSON.parse(await fsp.readFile(path.join(pair.primaryState, 'vm1', 'state.json'), 'utf8'));
      expect(onDisk).to.include({ role: 'secondary', committedGeneration: 1, applying: null });
    });

    it('a secondary with a generation partly applied refuses to become primary; a consistent one becomes primary, reconciles with its demoted peer and replicates to it', async () => {
      pair = await MemoryMirrorPair.create(2 * MiB, { secondary: { checkpointBytes: 64 * KiB } });
      await fill(pair.source, 11);
      let cut = false;
      // The link fails at frame 30 of the initial sync and stays down (every later frame is cut too).
      pair.onFrame = (i) => (i >= 30 ? ((cut = true), 'cut') : 'pass');
      await pair.startSecondary();
      await pair.startPrimary();
      await pair.waitPrimary(() => cut, 'the cut');
      await pair.primary!.stop();
      pair.primary = null;
      pair.onFrame = null;
      const sec = pair.secondary!;
      // The frames that got through before the cut are applied, then the session ends.
      await pair.waitFor(() => sec, (s) => s.generation === 1 && s.connectedSince === null, 'the secondary to apply what came before the cut');
      const refused = await sec.changeRole('primary').then(
        () => null,
        (e) => e,
      );
      expect(refused?.code).to.equal('TM_ERR_STATE');
      expect(refused?.message).to.match(/partly applied/);
      expect(sec.role).to.equal('secondary');
      expect((await sec.status()).role).to.equal('secondary');

      // Finish the sync, then swap the roles: the old primary demotes, the old secondary promotes.
      await pair.startPrimary();
      await pair.waitCommitted(1);
      const old = pair.primary!;
      await old.changeRole('secondary');
      await sec.changeRole('primary');
      const promoted = JSON.parse(await fsp.readFile(path.join(pair.secondaryState, 'vm1', 'state.json'), 'utf8'));
      expect(promoted).to.include({ role: 'primary', generation: 1, committedGeneration: 1, pending: null });
      expect(promoted.reconcile).to.match(/promoted at generation 1/);
      // The new primary has no tracking state: it compares digests with its peer (nothing differs), then sends what is written on it.
      const reconciled = await pair.waitFor(() => sec, (s) => s.reconcile?.finished === true && s.state === 'in-sync', 'the reconciliation after the promotion');
      expect(reconciled.reconcile!.differingBytes).to.equal(0);
      expect(reconciled.sentBytes).to.equal(0);
      await pair.target.write(300 * KiB, textLike(12 * KiB, prng(12)));
      const after = await pair.waitFor(() => sec, (s) => s.committedGeneration >= reconciled.committedGeneration + 1 && s.state === 'in-sync', 'the first generation of the new primary');
      expect(after.sentBytes).to.equal(12 * KiB);
      await expectSame(pair);
      expect((await old.status()).role).to.equal('secondary');
    });
  });

  it('property: link cuts and restarts of either side at random frames always converge, resending at most what was in flight since a checkpoint', async () => {
    const maxInFlight = 128 * KiB;
    const checkpointBytes = 128 * KiB;
    const maxExtent = 32 * KiB;
    const cs = 4096;
    /** Bytes of the chunks of `v` that are not all zeros: the data a generation of every chunk carries once. */
    const dataBytes = async (v: MemoryVolume) => {
      let n = 0;
      for (let off = 0; off < v.size; off += cs) {
        const b = await v.read(off, Math.min(cs, v.size - off));
        if (b.some((x) => x !== 0)) n += b.length;
      }
      return n;
    };
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 1 << 30 }),
        // A clean initial sync of this volume takes about 60-70 frames (both directions): faults land in it or in the next generation.
        fc.array(fc.record({ at: fc.integer({ min: 0, max: 90 }), what: fc.constantFrom('cut', 'restart-primary', 'restart-secondary') }), { maxLength: 6 }),
        fc.boolean(),
        async (seed, faults, changeAfter) => {
          pair = await MemoryMirrorPair.create(1 * MiB + 777, { primary: { maxInFlight, maxExtent }, secondary: { checkpointBytes } });
          let restarts: Promise<void> = Promise.resolve();
          try {
            await fill(pair.source, seed, 10);
            let needed = await dataBytes(pair.source);
            const plan = [...faults].sort((a, b) => a.at - b.at);
            let fired = 0;
            pair.onFrame = (i) => {
              let action: 'pass' | 'cut' = 'pass';
              while (plan.length && plan[0]!.at <= i) {
                const f = plan.shift()!;
                fired++;
                if (f.what === 'cut') action = 'cut';
                else restarts = restarts.then(() => pair.restart(f.what === 'restart-primary' ? 'primary' : 'secondary'));
              }
              return action;
            };
            await pair.startSecondary();
            await pair.startPrimary();
            await pair.waitCommitted(1);
            await restarts;
            let gen = 1;
            if (changeAfter) {
              await pair.waitCommitted(1);
              const rnd = prng(seed + 1);
              // Written chunks travel again whole; the zeroed range (apart from the write) travels as zeros.
              const off = 128 * KiB + Math.floor(rnd() * 800) * KiB;
              await pair.source.write(off, textLike(70 * KiB, rnd));
              await pair.source.zero(0, 64 * KiB);
              needed += (Math.ceil((off + 70 * KiB) / cs) - Math.floor(off / cs)) * cs;
              gen = 2;
            }
            await pair.waitCommitted(gen);
            await restarts;
            await pair.waitCommitted(gen);
            expect(await sameContent(pair.source, pair.target), `seed ${seed}, faults ${JSON.stringify(faults)}`).to.equal(true);
            const sent = await pair.sentBytes();
            const applied = await pair.appliedBytes();
            if (process.env.TM_DEBUG_PROPERTY) console.log({ seed, faults, changeAfter, fired, needed, sent, applied, frames: pair.framesSeen });
            expect(applied, 'the secondary applied every changed data byte').to.be.at.least(needed);
            expect(applied, 'the secondary never applies what no primary sent').to.be.at.most(sent);
            // What was applied twice: per fault at most a checkpoint's worth, the bytes in flight and one piece.
            expect(applied - needed, `resent after ${fired} fault(s)`).to.be.at.most(fired * (checkpointBytes + maxInFlight + maxExtent));
          } finally {
            // No fault fires any more, and a restart under way ends before the state goes.
            pair.onFrame = null;
            await restarts.catch(() => {});
            await pair.cleanup();
          }
        },
      ),
      { numRuns: Number(process.env.TM_PROPERTY_RUNS ?? 25), seed: process.env.TM_PROPERTY_SEED ? Number(process.env.TM_PROPERTY_SEED) : undefined, path: process.env.TM_PROPERTY_PATH },
    );
  });
});
