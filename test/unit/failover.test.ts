import { expect } from 'chai';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { appendHistory, compareHistories, MAX_HISTORY, newGenId, type GenId } from '../../src/mirror/history.js';
import type { Mirror } from '../../src/mirror/mirror.js';
import type { MirrorStatus } from '../../src/mirror/status.js';
import { prng, textLike } from '../../src/util/sample.js';
import { sameContent, type MemoryVolume } from '../../src/volume/memory.js';
import { MemoryMirrorPair } from '../helpers/mirror-pair.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CS = 4096;

/** Write `n` pieces of text-like data at chunk-aligned offsets chosen by `seed`; returns the chunk indices written. */
async function scribble(v: MemoryVolume, seed: number, n: number): Promise<Set<number>> {
  const rnd = prng(seed);
  const chunks = new Set<number>();
  for (let i = 0; i < n; i++) {
    const len = (1 + Math.floor(rnd() * 4)) * CS;
    const off = Math.floor(rnd() * ((v.size - len) / CS)) * CS;
    await v.write(off, textLike(len, prng(seed * 1000 + i)));
    for (let c = off / CS; c < (off + len) / CS; c++) chunks.add(c);
  }
  return chunks;
}

async function sha(v: MemoryVolume): Promise<string> {
  const h = createHash('sha256');
  for (let off = 0; off < v.size; off += MiB) h.update(await v.read(off, Math.min(MiB, v.size - off)));
  return h.digest('hex');
}

function rejection(p: Promise<unknown>): Promise<{ code?: string; message: string } | null> {
  return p.then(
    () => null,
    (e) => e,
  );
}

const gid = (node: string, g: number): GenId => newGenId(node, g);

describe('generation history (issue 12 §2): finding the last common generation', () => {
  it('finds the fork point of two chains that share a prefix', () => {
    const base = [gid('a', 1), gid('a', 2), gid('a', 3)];
    const a = [...base, gid('a', 4)];
    const b = [...base, gid('b', 4), gid('b', 5)];
    const r = compareHistories(a, b);
    expect(r.common).to.deep.equal(base[2]);
    expect(r.localAhead.map((g) => g.node + g.generation)).to.deep.equal(['a4']);
    expect(r.remoteAhead.map((g) => g.node + g.generation)).to.deep.equal(['b4', 'b5']);
  });

  it('equal numbers from different nodes or ids are different generations', () => {
    const one = gid('a', 1);
    const r = compareHistories([one, gid('a', 2)], [one, gid('a', 2)]);
    expect(r.common).to.deep.equal(one);
    expect(r.localAhead).to.have.length(1);
    expect(r.remoteAhead).to.have.length(1);
  });

  it('no common generation: disjoint chains, and a chain truncated by its bound past the fork', () => {
    expect(compareHistories([gid('a', 1)], [gid('b', 1)]).common).to.equal(null);
    expect(compareHistories([], [gid('b', 1)]).common).to.equal(null);
    // A long run of generations on one side pushes the fork out of its bounded chain.
    const fork = gid('a', 1);
    let a: GenId[] = [fork];
    for (let g = 2; g <= MAX_HISTORY + 5; g++) a = appendHistory(a, gid('a', g));
    expect(a).to.have.length(MAX_HISTORY);
    expect(a[0]!.generation).to.equal(6);
    const b = [fork, gid('b', 2)];
    expect(compareHistories(a, b).common).to.equal(null);
    // Within the bound it is found.
    const a2 = appendHistory([fork], gid('a', 2));
    expect(compareHistories(a2, b).common).to.deep.equal(fork);
  });

  it('a full sync starts a new chain', () => {
    const h = appendHistory([gid('a', 1), gid('a', 2)], gid('a', 1), true);
    expect(h).to.have.length(1);
  });
});

describe('failover and failback over the in-memory engine (issue 12)', function () {
  this.timeout(60_000);
  let pair: MemoryMirrorPair;
  afterEach(async () => {
    await pair?.cleanup();
  });

  const status = (m: Mirror | null) => m!.status();
  const waitSide = (m: () => Mirror | null, done: (s: MirrorStatus) => boolean, what: string) => pair.waitFor(m, done, what);

  /** An initial sync plus one generation, then site A (primary) is lost while generation 3 is being applied. */
  async function loseSiteA(): Promise<{ committedSha: string; committed: number }> {
    // Small extents (16 KiB, and batches of scattered pieces no larger): generation 3 takes many frames, so the cut lands inside it.
    pair = await MemoryMirrorPair.create(2 * MiB, { secondary: { checkpointBytes: 32 * KiB }, primary: { maxExtent: 16 * KiB } });
    await scribble(pair.source, 1, 40);
    await pair.startSecondary();
    await pair.startPrimary();
    await pair.waitCommitted(1);
    await scribble(pair.source, 2, 10);
    await pair.waitCommitted(2);
    const committedSha = await sha(pair.source);
    // Generation 3 is cut half way: the link drops after a few of its frames, and site A dies.
    const start = pair.framesSeen;
    let cut = false;
    pair.onFrame = (i) => (i >= start + 14 ? ((cut = true), 'cut') : 'pass');
    await scribble(pair.source, 3, 60);
    await pair.waitPrimary(() => cut, 'the cut inside generation 3');
    await pair.primary!.abort();
    pair.onFrame = null;
    await waitSide(() => pair.secondary, (s) => s.connectedSince === null && s.generation === 3, 'site B to apply what came before the cut');
    return { committedSha, committed: 2 };
  }

  it('promote rolls a torn replica back to its last committed generation and makes it primary; the old primary is refused as a split brain until demoted; the reverse resync sends only the union; switchover hands the role back with nothing lost', async () => {
    const { committedSha, committed } = await loseSiteA();
    const b = pair.secondary!;
    expect((await status(b)).generation).to.equal(3);
    expect(await sha(pair.target)).to.not.equal(committedSha, 'the replica is torn before the promote');

    // Promote B: the image of generation 2, exactly.
    const rep = await b.promote();
    expect(rep).to.include({ role: 'primary', committedGeneration: committed, undone: 3 });
    expect(await sha(pair.target)).to.equal(committedSha);
    expect(b.role).to.equal('primary');
    const bState = JSON.parse(await fsp.readFile(path.join(pair.secondaryState, 'vm1', 'state.json'), 'utf8'));
    expect(bState).to.include({ role: 'primary', committedGeneration: 2, generation: 2, applying: null, reconcile: null });
    expect(bState.history.map((g: GenId) => g.generation)).to.deep.equal([1, 2]);
    const bs = await status(b);
    expect(bs.roleConflict).to.match(/config says role secondary, but the mirror is primary/);

    // B is written on; A comes back as it was (primary, with its torn generation 3 pending and more writes).
    const onB = await scribble(pair.target, 4, 12);
    const onA = await scribble(pair.source, 5, 8);
    const aPending = JSON.parse(await fsp.readFile(path.join(pair.primaryState, 'vm1', 'state.json'), 'utf8'));
    expect(aPending.pending).to.equal(3);
    const bBefore = await sha(pair.target);
    await pair.startPrimary();
    const a = pair.primary!;
    const sbA = await waitSide(() => a, (s) => s.splitBrain != null && s.error !== null, 'A to see the split brain');
    expect(sbA.error?.code).to.equal('TM_ERR_SPLIT_BRAIN');
    expect(sbA.splitBrain!.common!.generation).to.equal(2);
    expect(sbA.splitBrain!.resolve).to.match(/thinmirror resolve vm1 --discard-local/);
    expect(sbA.splitBrain!.localBytes).to.be.greaterThan(0);
    // Each side learns the other's changed bytes when it connects to it (both keep trying).
    const sbB = await waitSide(() => b, (s) => s.splitBrain != null && s.splitBrain.peerBytes !== null, 'B to see the split brain');
    expect(sbB.splitBrain!.common!.generation).to.equal(2);
    expect(sbB.splitBrain!.peerBytes).to.equal(sbA.splitBrain!.localBytes);
    expect(await sha(pair.target)).to.equal(bBefore, 'nothing was written on B');

    // Demote A: it keeps what it changed since generation 2 (generation 3 and the writes after it).
    const sentBefore = (await status(b)).sentBytes;
    const dem = await a.demote();
    expect(dem.role).to.equal('secondary');
    expect(dem.divergentBytes).to.be.greaterThan(0);
    // B connects to A, and sends the union: what B changed plus what only A changed.
    await waitSide(() => b, (s) => s.state === 'in-sync' && s.committedGeneration >= 3 && s.splitBrain === null, 'the reverse resync');
    expect(await sameContent(pair.source, pair.target)).to.equal(true);
    const aState = JSON.parse(await fsp.readFile(path.join(pair.primaryState, 'vm1', 'state.json'), 'utf8'));
    expect(aState.divergence).to.equal(null);
    expect(aState.role).to.equal('secondary');
    // Chunks in the union: B's writes, A's writes after the failover, and A's generation-3 writes (all of seed 3).
    const union = new Set([...onB, ...onA, ...(await chunksOf(3, 60))]);
    const sent = (await status(b)).sentBytes - sentBefore;
    expect(sent).to.be.at.most(1.1 * union.size * CS);
    expect(sent).to.be.at.least(onB.size * CS);
    const as = await status(a);
    expect(as.consistency!.consistentGeneration).to.equal(as.committedGeneration);

    // Switchover back to A with zero loss: B commits its last writes, A takes over.
    await scribble(pair.target, 6, 5);
    const finalSha = await sha(pair.target);
    const sw = await b.switchover();
    expect(sw.role).to.equal('secondary');
    expect(sw.divergentBytes).to.equal(0);
    await waitSide(() => a, (s) => s.role === 'primary' && s.state === 'in-sync', 'A to be promoted by the switchover');
    expect(await sha(pair.source)).to.equal(finalSha);
    const sentA0 = (await status(a)).sentBytes;
    // Replication A -> B resumes with nothing to resend; new writes flow.
    const newer = await scribble(pair.source, 7, 3);
    const gen = (await status(a)).committedGeneration;
    await waitSide(() => a, (s) => s.committedGeneration > gen && s.state === 'in-sync', 'a generation A -> B after the switchover');
    expect(await sameContent(pair.source, pair.target)).to.equal(true);
    expect((await status(a)).sentBytes - sentA0).to.be.at.most(newer.size * CS);
    expect((await status(b)).role).to.equal('secondary');
  });

  it('promote is refused while the primary is connected unless --force, and demote of a secondary or promote of a primary is refused', async () => {
    pair = await MemoryMirrorPair.create(1 * MiB);
    await scribble(pair.source, 1, 10);
    await pair.startSecondary();
    await pair.startPrimary();
    await pair.waitCommitted(1);
    await waitSide(() => pair.secondary, (s) => s.connectedSince !== null, 'the session');
    const e = await rejection(pair.secondary!.promote());
    expect(e?.code).to.equal('TM_ERR_PEER_CONNECTED');
    expect(pair.secondary!.role).to.equal('secondary');
    expect((await rejection(pair.secondary!.demote()))?.code).to.equal('TM_ERR_ROLE');
    expect((await rejection(pair.primary!.promote()))?.code).to.equal('TM_ERR_ROLE');
    expect((await rejection(pair.primary!.resolve({ discardLocal: true })))?.code).to.equal('TM_ERR_ROLE');
    // --force: B becomes primary while A still is: A is refused as a split brain at its next connection.
    const rep = await pair.secondary!.promote({ force: true });
    expect(rep.role).to.equal('primary');
    const sb = await waitSide(() => pair.primary, (s) => s.splitBrain != null, 'A to find the split brain');
    expect(sb.splitBrain!.why).to.match(/both sides are primary/);
  });

  it('promote of a torn replica with consistency off is refused (TM_ERR_CONSISTENCY) and the secondary keeps receiving', async () => {
    // Small extents: generation 2 takes many frames, so the cut lands inside it.
    pair = await MemoryMirrorPair.create(2 * MiB, { secondary: { consistency: 'off', checkpointBytes: 32 * KiB }, primary: { maxExtent: 16 * KiB } });
    await scribble(pair.source, 31, 40);
    await pair.startSecondary();
    await pair.startPrimary();
    await pair.waitCommitted(1);
    const start = pair.framesSeen;
    let cut = false;
    pair.onFrame = (i) => (i >= start + 14 ? ((cut = true), 'cut') : 'pass');
    await scribble(pair.source, 32, 60);
    await pair.waitPrimary(() => cut, 'the cut inside generation 2');
    await pair.primary!.abort();
    pair.onFrame = null;
    const b = pair.secondary!;
    await waitSide(() => b, (s) => s.connectedSince === null && s.generation === 2, 'B to hold a partly applied generation 2');
    const e = await rejection(b.promote());
    expect(e?.code).to.equal('TM_ERR_CONSISTENCY');
    expect(b.role).to.equal('secondary');
    // Still a running secondary: the primary comes back and finishes generation 2.
    await pair.startPrimary();
    await pair.waitCommitted(2);
    expect(await sameContent(pair.source, pair.target)).to.equal(true);
  });

  it('a one-way config keeps working; promote and demote then say what is missing for replication the other way', async () => {
    pair = await MemoryMirrorPair.create(1 * MiB);
    // B has no peer: in its config (the harness gives it no connection either); A no listener.
    pair.oneWay.add('b');
    await scribble(pair.source, 21, 10);
    await pair.startSecondary();
    await pair.startPrimary();
    await pair.waitCommitted(1);
    await pair.primary!.abort();
    await waitSide(() => pair.secondary, (s) => s.connectedSince === null, 'B to see A gone');
    const rep = await pair.secondary!.promote();
    expect(rep.role).to.equal('primary');
    expect(rep.warnings.join(' ')).to.match(/no peer: URL in site-b's config.*add peer: ws:\/\/HOST:PORT/);
    const st = await waitSide(() => pair.secondary, (s) => s.error !== null, 'the promoted side to report why it cannot replicate');
    expect(st.error!.code).to.equal('TM_ERR_CONFIG');
    expect(st.error!.message).to.match(/no peer: URL/);
    // A one-way site A (no listener) is told so by demote.
    pair.oneWay.add('a');
    await pair.startPrimary();
    const dem = await pair.primary!.demote();
    expect(dem.warnings.join(' ')).to.match(/no listen: address/);
  });

  for (const loser of ['A', 'B'] as const) {
    it(`split brain: both sides wrote after diverging; nothing is written until resolve --discard-local on ${loser}, which then receives the union`, async () => {
      pair = await MemoryMirrorPair.create(2 * MiB);
      await scribble(pair.source, 11, 30);
      await pair.startSecondary();
      await pair.startPrimary();
      await pair.waitCommitted(1);
      await pair.primary!.abort();
      const b = pair.secondary!;
      await waitSide(() => b, (s) => s.connectedSince === null, 'B to see A gone');
      await b.promote();
      const onA = await scribble(pair.source, 12, 6);
      const onB = await scribble(pair.target, 13, 7);
      const [aSha, bSha] = [await sha(pair.source), await sha(pair.target)];
      await pair.startPrimary();
      const a = pair.primary!;
      await waitSide(() => a, (s) => s.splitBrain != null, 'A to see the split brain');
      await waitSide(() => b, (s) => s.splitBrain != null, 'B to see the split brain');
      // Refused again and again, nothing written on either side.
      await new Promise((r) => setTimeout(r, 100));
      expect([await sha(pair.source), await sha(pair.target)]).to.deep.equal([aSha, bSha]);
      const union = new Set([...onA, ...onB]);
      const [winner, discarded, keep] = loser === 'A' ? [b, a, pair.target] : [a, b, pair.source];
      const sent0 = (await status(winner)).sentBytes;
      const winnerSha = await sha(keep);
      const r = await discarded.resolve({ discardLocal: true });
      expect(r.role).to.equal('secondary');
      await waitSide(() => winner, (s) => s.splitBrain === null && s.state === 'in-sync' && s.committedGeneration >= 2, 'the resync after resolve');
      expect(await sameContent(pair.source, pair.target)).to.equal(true);
      expect(await sha(keep)).to.equal(winnerSha, 'the winner kept its changes');
      const sent = (await status(winner)).sentBytes - sent0;
      expect(sent).to.be.at.most(1.1 * union.size * CS);
      expect((await status(discarded)).splitBrain).to.equal(null);
    });
  }
});

/** The chunks `scribble(v, seed, n)` writes (same arithmetic, no volume). */
async function chunksOf(seed: number, n: number): Promise<Set<number>> {
  const rnd = prng(seed);
  const size = 2 * MiB;
  const chunks = new Set<number>();
  for (let i = 0; i < n; i++) {
    const len = (1 + Math.floor(rnd() * 4)) * CS;
    const off = Math.floor(rnd() * ((size - len) / CS)) * CS;
    for (let c = off / CS; c < (off + len) / CS; c++) chunks.add(c);
  }
  return chunks;
}
