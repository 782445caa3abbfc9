import { expect } from 'chai';
import { RoaringBitmap32 } from '../../src/track/bitmap-store.js';
import * as gens from '../../src/mirror/generations.js';
import { newState, type MirrorState } from '../../src/mirror/state.js';

function primary(over: Partial<MirrorState> = {}): MirrorState {
  return { ...newState('primary', { volumeId: 'ab', volumeSize: 10 * 4096 + 100, chunkSize: 4096 }), ...over };
}

describe('generation bookkeeping (mirror/generations)', () => {
  it('a new mirror starts with the initial sync, then waits; a pending generation is sent before anything else', () => {
    const s = primary();
    expect(gens.isFresh(s)).to.equal(true);
    expect(gens.nextStep(s)).to.deep.equal({ kind: 'initial-sync' });
    const g = gens.createGeneration(s, 1000);
    expect(g).to.equal(1);
    expect(s).to.include({ generation: 1, pending: 1, cursor: 0, oldestUncommittedAt: 1000 });
    expect(gens.isFresh(s)).to.equal(false);
    expect(gens.nextStep(s)).to.deep.equal({ kind: 'send', generation: 1 });
    s.reconcile = 'lost';
    expect(gens.nextStep(s), 'pending wins over reconcile').to.deep.equal({ kind: 'send', generation: 1 });
    gens.commitGeneration(s, 1);
    expect(gens.nextStep(s)).to.deep.equal({ kind: 'reconcile', reason: 'lost' });
    s.reconcile = null;
    expect(gens.nextStep(s)).to.deep.equal({ kind: 'wait' });
  });

  it('creating a generation keeps the age of the oldest uncommitted change and clears a reconcile request', () => {
    const s = primary({ generation: 3, committedGeneration: 2, oldestUncommittedAt: 500, reconcile: 'x' });
    gens.createGeneration(s, 900);
    expect(s).to.include({ generation: 4, pending: 4, oldestUncommittedAt: 500, reconcile: null });
  });

  it('the cursor only moves forward', () => {
    const s = primary({ generation: 1, pending: 1 });
    expect(gens.advanceCursor(s, 8192)).to.equal(true);
    expect(gens.advanceCursor(s, 8192)).to.equal(false);
    expect(gens.advanceCursor(s, 4096)).to.equal(false);
    expect(s.cursor).to.equal(8192);
  });

  it('commit clears pending and cursor; the replica is then as old as the committed generation\'s view', () => {
    const s = primary({ generation: 1, committedGeneration: 1, committedViewAt: 100 });
    gens.createGeneration(s, 1000, 1200);
    expect(s).to.include({ pending: 2, pendingViewAt: 1200 });
    expect(gens.lagSeconds(s, 5000), 'generation 1 is still what the secondary holds').to.equal(4.9);
    gens.commitGeneration(s, 2);
    expect(s).to.include({ committedGeneration: 2, pending: null, pendingViewAt: null, cursor: 0, oldestUncommittedAt: null, committedViewAt: 1200 });
    expect(gens.lagSeconds(s, 10_000), 'never 0 while the volume may have been written since').to.equal(8.8);
  });

  it('issue 15: lag is now minus the committed view, or a later pass that found nothing changed; null when unknown', () => {
    expect(gens.lagSeconds(primary({ committedViewAt: 1000 }), 3500)).to.equal(2.5);
    expect(gens.lagSeconds(primary({ committedViewAt: 1000 }), 3500, 3000), 'an idle volume is not stale').to.equal(0.5);
    expect(gens.lagSeconds(primary({ committedViewAt: 3000 }), 3500, 1000)).to.equal(0.5);
    expect(gens.lagSeconds(primary(), 3500), 'no committed view time: unknown, never 0').to.equal(null);
    expect(gens.lagSeconds(primary({ oldestUncommittedAt: 1000 }), 3500), 'an uncommitted change says nothing of the replica').to.equal(null);
    expect(gens.lagSeconds(primary(), 3500, 2500)).to.equal(1);
    // A state from before view times commits a generation without one: unknown, not the commit's time.
    const s = primary({ generation: 2, committedGeneration: 1, pending: 2, committedViewAt: 500 });
    gens.commitGeneration(s, 2);
    expect(s.committedViewAt).to.equal(null);
  });

  it('a secondary that lost what it acknowledged makes the replica\'s age unknown', () => {
    const s = primary({ generation: 5, committedGeneration: 5, committedViewAt: 1000 });
    expect(gens.reconcileAfterHandshake(s, 3, null)).to.equal(true);
    expect(gens.lagSeconds(s, 2000)).to.equal(null);
  });

  it('a pending generation the secondary committed already is recognised (lost acknowledgement)', () => {
    const s = primary({ generation: 3, committedGeneration: 2, pending: 3 });
    expect(gens.committedMeanwhile(s, 3)).to.equal(3);
    expect(gens.committedMeanwhile(s, 2)).to.equal(null);
    expect(gens.committedMeanwhile(primary({ generation: 3, committedGeneration: 3 }), 3)).to.equal(null);
  });

  it('a primary without tracking state continues the numbering of a secondary that holds a replica, and reconciles', () => {
    const s = primary();
    expect(gens.reconcileAfterHandshake(s, 7, { generation: 8, cursor: 4096 })).to.equal(true);
    expect(s).to.include({ generation: 7, committedGeneration: 7 });
    expect(s.reconcile).to.match(/no tracking state.*generation 7 and part of 8/);
    expect(gens.nextStep(s).kind).to.equal('reconcile');
  });

  it('a secondary that reports less than it acknowledged lost its state: reconcile', () => {
    const s = primary({ generation: 5, committedGeneration: 5 });
    expect(gens.reconcileAfterHandshake(s, 2, null)).to.equal(true);
    expect(s.reconcile).to.match(/reports generation 2 but acknowledged 5/);
  });

  it('nothing to reconcile when both agree, or when a fresh primary meets an empty secondary', () => {
    expect(gens.reconcileAfterHandshake(primary({ generation: 5, committedGeneration: 5 }), 5, null)).to.equal(false);
    expect(gens.reconcileAfterHandshake(primary(), 0, null)).to.equal(false);
    // A pending generation is resent first; its commit settles the numbers.
    expect(gens.reconcileAfterHandshake(primary({ generation: 5, committedGeneration: 4, pending: 5 }), 0, null)).to.equal(false);
  });

  it('resumes the pending generation at the secondary cursor only when it was applying that generation', () => {
    const s = primary({ generation: 4, committedGeneration: 3, pending: 4 });
    expect(gens.resumeCursor(s, { generation: 4, cursor: 65536 })).to.equal(65536);
    expect(gens.resumeCursor(s, { generation: 3, cursor: 65536 })).to.equal(0);
    expect(gens.resumeCursor(s, null)).to.equal(0);
  });

  it('bitmapBytes counts the short tail chunk as it is', () => {
    const b = new RoaringBitmap32([0, 1, 10]); // 11 chunks, the last one holds 100 bytes
    expect(gens.bitmapBytes(b, 4096, 10 * 4096 + 100)).to.equal(2 * 4096 + 100);
    expect(gens.bitmapBytes(b, 4096, 10 * 4096 + 100, 1)).to.equal(4096 + 100);
    expect(gens.bitmapBytes(b, 4096, 10 * 4096 + 100, 11)).to.equal(0);
  });
});
