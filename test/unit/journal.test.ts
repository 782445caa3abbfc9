import { expect } from 'chai';
import { DelegatingVolume } from '../helpers/delegating-volume.js';
import { promises as fsp, mkdtempSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { TmError } from '../../src/errors.js';
import { HEAD_BYTES, journalFile, JournaledVolume, listJournals, RECORD_OVERHEAD, type JournalOpenOptions } from '../../src/volume/journal.js';
import { MemoryVolume, sameContent } from '../../src/volume/memory.js';
import { SparseFileVolume } from '../../src/volume/sparse-file.js';
import type { Volume } from '../../src/volume/volume.js';
import { rejection } from '../helpers/rejection.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CS = 64 * KiB;

/** `n` bytes of a pattern that differs with `seed` and position (never all zeros). */
function pattern(n: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = ((i * 31 + seed * 17) % 251) + 1;
  return b;
}

/**
 * A target that logs every write and zero (into a shared log, so the journal's
 * fdatasync can be placed among them) and can fail once `failAfter` of them
 * have been done: a rollback killed half way.
 */
class Probe extends DelegatingVolume {
  failAfter = Infinity;
  done = 0;
  constructor(
    inner: MemoryVolume,
    readonly log: string[] = [],
  ) {
    super(inner);
  }
  private gate(what: string): void {
    if (this.done >= this.failAfter) throw new TmError('TM_ERR_VOLUME_IO', `killed before ${what}`);
    this.done++;
    this.log.push(what);
  }
  override async write(offset: number, data: Buffer): Promise<void> {
    this.gate('write');
    await this.inner.write(offset, data);
  }
  override async zero(offset: number, length: number): Promise<void> {
    this.gate('zero');
    await this.inner.zero(offset, length);
  }
  override flush(): Promise<void> {
    return this.inner.flush();
  }
  override close(): Promise<void> {
    return this.inner.close();
  }
}

describe('undo journal (JournaledVolume): the save volume of a secondary (issue 11 §1)', () => {
  let root: string;
  let n = 0;
  let dir: string;
  before(() => (root = mkdtempSync(path.join(os.tmpdir(), 'tm-journal-'))));
  after(() => rmSync(root, { recursive: true, force: true }));
  beforeEach(() => (dir = path.join(root, `j${n++}`)));

  // The tests below, but those of the holes saved at begin, watch each call save its own chunks: no holes saved at begin.
  const open = (target: Volume, o: Partial<JournalOpenOptions> = {}) => JournaledVolume.open(target, { dir, chunkSize: CS, committed: 0, presaveHoles: 0, ...o });
  const fileSize = async (f: string) => (await fsp.stat(f)).size;
  const exists = async (f: string) => fsp.stat(f).then(
    () => true,
    () => false,
  );

  /**
   * 17 chunks of 64 KiB, the last one 12 KiB: data in chunks 0-3, 6, 9 and
   * the short last chunk (16); the others are holes.
   */
  async function image(): Promise<MemoryVolume> {
    const v = MemoryVolume.create(16 * CS + 12 * KiB);
    await v.write(0, pattern(4 * CS, 1));
    await v.write(6 * CS, pattern(CS, 2));
    await v.write(9 * CS, pattern(CS, 3));
    await v.write(16 * CS, pattern(12 * KiB, 4));
    return v;
  }
  /** An image, a copy of it as it was, and generation 1 written over it through the journal (closed, not committed). */
  async function journaledGeneration(): Promise<{ v: MemoryVolume; before: MemoryVolume }> {
    const v = await image();
    const before = v.clone();
    const jv = await open(v.handle());
    await jv.begin(1);
    await generation(jv);
    await jv.close();
    return { v, before };
  }


  /**
   * One generation: overwrites (chunk 1 partly, 3 whole), a write from data
   * into holes (3-5), zeros over data and a hole (6-7, 7 needs no record),
   * half a chunk zeroed (2), a write into a hole (10), and the short last chunk.
   * Saved: data 1, 2, 3, 6, 16 (4 x 64 KiB + 12 KiB); holes 4-5, 10.
   */
  async function generation(jv: JournaledVolume): Promise<void> {
    await jv.write(CS + 100, pattern(5000, 5));
    await jv.write(3 * CS, pattern(3 * CS, 6));
    await jv.zero(6 * CS, 2 * CS);
    await jv.zero(2 * CS + CS / 2, CS / 2);
    await jv.write(10 * CS + 7, pattern(100, 7));
    await jv.write(16 * CS + 1000, pattern(3000, 8));
  }
  const SAVED_DATA = 4 * CS + 12 * KiB;
  /** Records of {@link generation}: 1, 3, hole 4-5, 6, 2, hole 10, 16. */
  const RECORDS = 7;

  it('rolls a generation of overwrites, zeros and writes into holes back to the exact image, holes included', async () => {
    const v = await image();
    const before = v.clone();
    const allocBefore = await v.allocated();
    const jv = await open(v.handle());
    await jv.begin(1);
    await generation(jv);
    expect(await sameContent(v, before)).to.equal(false);
    expect(jv.stats).to.deep.equal({
      generation: 1,
      committed: 0,
      bytes: HEAD_BYTES + RECORDS * RECORD_OVERHEAD + SAVED_DATA,
      savedChunks: 8,
      records: RECORDS,
      syncs: 6,
    });
    expect(await fileSize(journalFile(dir, 1))).to.equal(HEAD_BYTES + RECORDS * RECORD_OVERHEAD + SAVED_DATA);
    await jv.close();

    const flushes = v.flushes;
    const r = await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
    expect(r).to.deep.equal({ generation: 1, generations: [1], chunks: 8, bytes: SAVED_DATA });
    expect(await sameContent(v, before)).to.equal(true);
    expect(await v.allocated()).to.deep.equal(allocBefore);
    expect(v.flushes).to.equal(flushes + 1);
    expect(await exists(journalFile(dir, 1))).to.equal(false);
    expect(await listJournals(dir)).to.deep.equal([]);
  });

  it('saves each chunk once per generation, however often it is written, and again in the next one', async () => {
    const v = await image();
    const syncs: number[] = [];
    const jv = await open(v.handle(), { datasync: async (fh) => (syncs.push(1), fh.datasync()) });
    await jv.begin(1);
    for (let i = 0; i < 5; i++) await jv.write(100 * i, pattern(CS, 10 + i));
    await jv.zero(0, CS);
    await jv.write(0, pattern(2 * CS, 20)); // chunk 1 is new
    await jv.zero(CS, 10);
    // Chunk 0 by the first write, chunk 1 by the second ([100, 64 KiB + 100)); nothing new after.
    expect(jv.stats.records).to.equal(2);
    expect(syncs.length).to.equal(2); // a call with nothing new to save does not sync
    expect(jv.stats.savedChunks).to.equal(2);
    const f1 = journalFile(dir, 1);
    expect(await fileSize(f1)).to.equal(HEAD_BYTES + 2 * RECORD_OVERHEAD + 2 * CS);

    // 1 MiB over 16 chunks (4 data, 2 allocated zeros, 10 holes): one append, one fdatasync.
    syncs.length = 0;
    const v2 = MemoryVolume.create(32 * CS);
    await v2.write(0, pattern(4 * CS, 30));
    await v2.write(8 * CS, Buffer.alloc(2 * CS)); // allocated zeros: a zeros record, no payload
    const jv2 = await JournaledVolume.open(v2, { dir: path.join(dir, 'b'), chunkSize: CS, committed: 0, presaveHoles: 0, datasync: async (fh) => (syncs.push(1), fh.datasync()) });
    await jv2.begin(1);
    syncs.length = 0;
    await jv2.write(0, pattern(16 * CS, 31));
    expect(syncs.length).to.equal(1);
    // data 0-3, hole 4-7, zeros 8-9, hole 10-15
    expect(jv2.stats.records).to.equal(4);
    expect(await fileSize(journalFile(path.join(dir, 'b'), 1))).to.equal(HEAD_BYTES + 4 * RECORD_OVERHEAD + 4 * CS);
    await jv2.close();

    await jv.flush();
    await jv.commit(1);
    expect(await exists(f1)).to.equal(false);
    await jv.begin(2);
    await jv.write(0, pattern(10, 40));
    expect(await fileSize(journalFile(dir, 2))).to.equal(HEAD_BYTES + RECORD_OVERHEAD + CS);
    await jv.close();
  });

  it('issues the target write only after the journal fdatasync; a failed journal fdatasync leaves the target unchanged and refuses more writes until reopened', async () => {
    const v = await image();
    const before = v.clone();
    const log: string[] = [];
    let fail: Error | null = null;
    const datasync = async (fh: fsp.FileHandle) => {
      log.push('journal-sync');
      if (fail) throw fail;
      await fh.datasync();
    };
    const jv = await open(new Probe(v.handle(), log), { datasync });
    await jv.begin(1);
    log.length = 0;
    await jv.write(0, pattern(100, 50));
    await jv.zero(6 * CS, CS);
    await jv.write(0, pattern(100, 51)); // chunk 0 saved already: no sync
    expect(log).to.deep.equal(['journal-sync', 'write', 'journal-sync', 'zero', 'write']);

    const mid = v.clone();
    log.length = 0;
    fail = Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
    const e = await rejection(jv.write(9 * CS, pattern(10, 52)));
    expect(e.code).to.equal('TM_ERR_VOLUME_IO');
    expect(log).to.deep.equal(['journal-sync']);
    expect(await sameContent(v, mid)).to.equal(true);
    // Poisoned until reopened, even for a chunk saved before the failure.
    fail = null;
    expect((await rejection(jv.write(0, pattern(10, 53)))).code).to.equal('TM_ERR_VOLUME_IO');
    expect((await rejection(jv.zero(9 * CS, CS))).code).to.equal('TM_ERR_VOLUME_IO');
    expect(log).to.deep.equal(['journal-sync']);
    await jv.close();

    // A full journal filesystem is TM_ERR_NO_SPACE.
    const jv2 = await open(new Probe(v.handle(), log), { datasync });
    await jv2.begin(1);
    fail = Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' });
    expect((await rejection(jv2.write(12 * CS, pattern(10, 54)))).code).to.equal('TM_ERR_NO_SPACE');
    expect(await sameContent(v, mid)).to.equal(true);
    await jv2.close();

    // Reopened, it goes on; the records of the failed calls (durable or not) are harmless.
    fail = null;
    const jv3 = await open(v.handle());
    await jv3.begin(1);
    await jv3.write(9 * CS, pattern(10, 55));
    await jv3.close();
    await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
    expect(await sameContent(v, before)).to.equal(true);
  });

  it('refuses writes and zeros outside a begun generation (TM_ERR_INTERNAL), and begin at or below the committed generation', async () => {
    const v = await image();
    const before = v.clone();
    const jv = await open(v.handle(), { committed: 3 });
    expect((await rejection(jv.write(0, pattern(10, 1)))).code).to.equal('TM_ERR_INTERNAL');
    expect((await rejection(jv.zero(0, CS))).code).to.equal('TM_ERR_INTERNAL');
    expect((await rejection(jv.begin(3))).code).to.equal('TM_ERR_INTERNAL');
    expect((await rejection(jv.begin(2))).code).to.equal('TM_ERR_INTERNAL');
    await jv.begin(4);
    expect((await rejection(jv.write(v.size - 1, pattern(2, 1)))).code).to.equal('TM_ERR_VOLUME_RANGE');
    expect((await rejection(jv.commit(5))).code).to.equal('TM_ERR_INTERNAL');
    await jv.write(0, pattern(10, 2));
    await jv.commit(4);
    expect((await rejection(jv.write(0, pattern(10, 3)))).code).to.equal('TM_ERR_INTERNAL');
    expect((await rejection(jv.begin(4))).code).to.equal('TM_ERR_INTERNAL');
    expect(jv.stats).to.include({ generation: null, committed: 4, bytes: 0, savedChunks: 0 });
    await jv.close();
    expect((await rejection(jv.write(0, pattern(10, 4)))).code).to.equal('TM_ERR_VOLUME_IO');
    const changed = await v.read(0, 10);
    expect(changed.equals(pattern(10, 2))).to.equal(true);
    expect(await sameContent(v, before)).to.equal(false);
  });

  it('the unsafe ordering knob (for the crash test) writes the target before the journal fdatasync', async () => {
    const v = await image();
    const before = v.clone();
    const log: string[] = [];
    const jv = await open(new Probe(v.handle(), log), { unsafeWriteBeforeJournal: true, datasync: async (fh) => (log.push('journal-sync'), fh.datasync()) });
    await jv.begin(1);
    log.length = 0;
    await jv.write(0, pattern(100, 60));
    await jv.write(0, pattern(100, 61));
    expect(log).to.deep.equal(['write', 'journal-sync', 'write']);
    await jv.close();
    await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
    expect(await sameContent(v, before)).to.equal(true); // no crash: the records are still right
  });

  it('an initial sync onto an empty target writes only hole records and reads nothing', async () => {
    const v = MemoryVolume.create(4 * MiB);
    const jv = await open(v.handle());
    await jv.begin(1);
    const reads = v.reads;
    let writes = 0;
    // 256 KiB data extents with trims in between, as generation 1 sends them.
    for (let at = 0; at < v.size; at += MiB) {
      await jv.write(at, pattern(256 * KiB, at / MiB));
      writes++;
      await jv.write(at + 320 * KiB, pattern(64 * KiB + 5, 9));
      writes++;
      await jv.zero(at + 512 * KiB, 512 * KiB); // trim of a hole: nothing to save
    }
    expect(v.reads).to.equal(reads);
    expect(jv.stats.records).to.equal(writes);
    expect(jv.stats.syncs).to.equal(writes);
    expect(jv.stats.bytes).to.equal(HEAD_BYTES + writes * RECORD_OVERHEAD);
    expect(await fileSize(journalFile(dir, 1))).to.equal(HEAD_BYTES + writes * RECORD_OVERHEAD);
    await jv.close();
    const r = await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
    expect(r).to.deep.equal({ generation: 1, generations: [1], chunks: 4 * (4 + 2), bytes: 0 });
    expect(await v.allocated()).to.deep.equal([]);
  });

  describe('holes saved at begin (presaveHoles, the default)', () => {
    const openDefault = (target: Volume, o: Partial<JournalOpenOptions> = {}) => JournaledVolume.open(target, { dir, chunkSize: CS, committed: 0, ...o });

    it('an initial sync onto an empty target journals one hole record at begin, with one fdatasync, and nothing per write', async () => {
      const v = MemoryVolume.create(4 * MiB);
      const syncs: number[] = [];
      const jv = await openDefault(v.handle(), { datasync: async (fh) => (syncs.push(1), fh.datasync()) });
      await jv.begin(1);
      expect(jv.stats.records).to.equal(1);
      expect(syncs.length).to.equal(1);
      const reads = v.reads;
      for (let at = 0; at < v.size; at += MiB) {
        await jv.write(at, pattern(256 * KiB, at / MiB));
        await jv.write(at + 320 * KiB, pattern(64 * KiB + 5, 9));
        await jv.zero(at + 512 * KiB, 512 * KiB);
      }
      expect(v.reads).to.equal(reads);
      expect(jv.stats.records).to.equal(1);
      expect(syncs.length).to.equal(1);
      expect(await fileSize(journalFile(dir, 1))).to.equal(HEAD_BYTES + RECORD_OVERHEAD);
      await jv.close();
      const r = await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
      expect(r).to.deep.equal({ generation: 1, generations: [1], chunks: 4 * MiB / CS, bytes: 0 });
      expect(await v.allocated()).to.deep.equal([]);
    });

    it('a target with data and holes: one record per hole at begin, none for writes into them, and rollback gives the exact image', async () => {
      const v = await image();
      const before = v.clone();
      const jv = await openDefault(v.handle());
      await jv.begin(1);
      // Holes 4-5, 7-8, 10-15.
      expect(jv.stats.records).to.equal(3);
      expect(jv.stats.savedChunks).to.equal(10);
      await generation(jv);
      // generation() saves data 1, 2, 3, 6, 16 with records of their own; its holes (4-5, 10) were saved at begin.
      expect(jv.stats.records).to.equal(3 + 5);
      expect(jv.stats.bytes).to.equal(HEAD_BYTES + 8 * RECORD_OVERHEAD + SAVED_DATA);
      await jv.close();
      await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
      expect(await sameContent(v, before)).to.equal(true);
      expect(await v.allocated()).to.deep.equal(await before.allocated());
    });

    it('at most presaveHoles records, the largest holes first; the others are saved by the writes into them', async () => {
      const v = await image();
      const before = v.clone();
      const jv = await openDefault(v.handle(), { presaveHoles: 1 });
      await jv.begin(1);
      expect(jv.stats.records).to.equal(1);
      expect(jv.stats.savedChunks).to.equal(6); // 10-15
      await jv.write(11 * CS, pattern(100, 1));
      expect(jv.stats.records).to.equal(1);
      await jv.write(4 * CS, pattern(100, 2));
      expect(jv.stats.records).to.equal(2);
      await jv.close();
      await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
      expect(await sameContent(v, before)).to.equal(true);
    });

    it('begun again after a restart: a hole touching a chunk saved before is left to the writes, the others are saved', async () => {
      const v = await image();
      const before = v.clone();
      const jv = await open(v.handle());
      await jv.begin(1);
      await jv.zero(6 * CS, CS); // chunk 6 saved (its data), then punched: a hole now
      await jv.close();
      const again = await openDefault(v.handle());
      await again.begin(1);
      // Holes now 4-8 (chunk 6 punched) and 10-15: 4-8 touches saved chunk 6 and is left.
      expect(again.stats.records).to.equal(1);
      await again.write(7 * CS, pattern(CS, 2));
      expect(again.stats.records).to.equal(2); // hole 7, its own record
      await again.write(11 * CS, pattern(CS, 3));
      expect(again.stats.records).to.equal(2);
      await again.close();
      await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
      expect(await sameContent(v, before)).to.equal(true);
      expect(await v.allocated()).to.deep.equal(await before.allocated());
    });
  });

  it('a chunk that was allocated but all zeros is journaled without payload and comes back as zeros', async () => {
    const v = MemoryVolume.create(8 * CS);
    await v.write(CS, Buffer.alloc(CS));
    await v.write(2 * CS, pattern(CS, 1));
    const before = v.clone();
    const jv = await open(v.handle());
    await jv.begin(1);
    await jv.write(0, pattern(4 * CS, 2));
    expect(jv.stats.bytes).to.equal(HEAD_BYTES + 4 * RECORD_OVERHEAD + CS); // hole 0, zeros 1, data 2, hole 3
    await jv.close();
    const r = await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
    expect(r).to.include({ chunks: 4, bytes: CS });
    expect(await sameContent(v, before)).to.equal(true);
    expect(await v.allocated()).to.deep.equal([{ offset: 2 * CS, length: CS }]); // chunk 1 became a hole
  });

  it('rollback is idempotent: killed after every number of target writes, then run again, it gives the image of the committed generation', async () => {
    let kills = 0;
    for (let k = 0; k <= RECORDS; k++) {
      dir = path.join(root, `kill${k}`);
      const { v, before } = await journaledGeneration();
      const probe = new Probe(v.handle());
      probe.failAfter = k;
      if (k < RECORDS) {
        expect((await rejection(JournaledVolume.rollback(probe, dir, { committed: 0 }))).code).to.equal('TM_ERR_VOLUME_IO');
        expect(probe.done).to.equal(k);
        expect(await exists(journalFile(dir, 1))).to.equal(true);
        kills++;
      } else {
        await JournaledVolume.rollback(probe, dir, { committed: 0 });
      }
      const again = await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
      expect(again.generation).to.equal(k < RECORDS ? 1 : null);
      expect(await sameContent(v, before), `killed after ${k}`).to.equal(true);
      expect(await v.allocated()).to.deep.equal(await before.allocated());
    }
    expect(kills).to.equal(RECORDS);
  });

  it('a rollback killed half way and then a restarted replica: the journal still undoes everything', async () => {
    const { v, before } = await journaledGeneration();
    const probe = new Probe(v.handle());
    probe.failAfter = 3;
    await rejection(JournaledVolume.rollback(probe, dir, { committed: 0 }));
    // The daemon starts again instead: generation 1 resumes, more chunks change.
    const jv2 = await open(v.handle());
    expect(jv2.stats.savedChunks).to.equal(8);
    await jv2.begin(1);
    await generation(jv2);
    await jv2.write(12 * CS, pattern(CS, 70));
    await jv2.write(0, pattern(CS, 71));
    expect(jv2.stats.records).to.equal(2);
    await jv2.close();
    await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
    expect(await sameContent(v, before)).to.equal(true);
  });

  it('a torn journal tail (an append cut before its fdatasync) is ignored by rollback and cut off before appending', async () => {
    for (const tear of ['truncate', 'whole', 'garbage'] as const) {
      dir = path.join(root, `torn-${tear}`);
      const v = await image();
      const before = v.clone();
      let crash = false;
      const jv = await open(v.handle(), {
        datasync: async (fh) => {
          if (crash) throw new Error('power lost before fdatasync returned');
          await fh.datasync();
        },
      });
      await jv.begin(1);
      await generation(jv);
      const f = journalFile(dir, 1);
      const good = await fileSize(f);
      crash = true;
      // Chunk 9 (data) and 12 (hole): appended, never synced, target untouched.
      await rejection(jv.write(9 * CS, pattern(4 * CS, 80)));
      await jv.close();
      const torn = good + 2 * RECORD_OVERHEAD + CS;
      expect(await fileSize(f)).to.equal(torn);
      if (tear === 'truncate') await fsp.truncate(f, torn - 5);
      if (tear === 'garbage') {
        await fsp.truncate(f, good + 40);
        await fsp.appendFile(f, Buffer.alloc(300));
      }
      const copy = path.join(root, `torn-${tear}-copy`);
      await fsp.cp(dir, copy, { recursive: true });

      // What stays valid of the unsynced batch DATA(9) + HOLE(11-12): both, DATA(9) only, nothing.
      const kept = { whole: { chunks: 3, bytes: torn }, truncate: { chunks: 1, bytes: good + RECORD_OVERHEAD + CS }, garbage: { chunks: 0, bytes: good } }[tear];
      // Rollback ignores what follows the valid prefix and replays the unsynced records before it, harmlessly.
      const v2 = v.clone();
      const r = await JournaledVolume.rollback(v2, dir, { committed: 0 });
      expect(r.chunks).to.equal(8 + kept.chunks);
      expect(await sameContent(v2, before)).to.equal(true);

      // Reopened and continued: the torn tail is cut, new records follow the valid prefix.
      dir = copy;
      const jv2 = await open(v.handle());
      await jv2.begin(1);
      await jv2.write(13 * CS, pattern(CS, 81));
      expect(await fileSize(journalFile(dir, 1))).to.equal(kept.bytes + RECORD_OVERHEAD);
      await jv2.close();
      const r2 = await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
      expect(r2.chunks).to.equal(8 + kept.chunks + 1);
      expect(await sameContent(v, before), tear).to.equal(true);
    }
  });

  it('a restart mid-generation: begin(N) again continues journal N; chunks saved before are not saved again with newer content', async () => {
    const v = await image();
    const before = v.clone();
    const jv = await open(v.handle());
    await jv.begin(5);
    await jv.write(0, pattern(2 * CS, 90));
    await jv.write(10 * CS, pattern(CS, 91));
    await jv.close();
    const size1 = await fileSize(journalFile(dir, 5));

    const jv2 = await open(v.handle());
    expect(jv2.stats).to.include({ generation: null, savedChunks: 3, bytes: size1 });
    await jv2.begin(5);
    await jv2.write(0, pattern(3 * CS, 92)); // chunks 0, 1 saved; 2 is new
    await jv2.zero(10 * CS, CS); // saved (was a hole)
    await jv2.write(9 * CS, pattern(100, 93)); // new
    expect(jv2.stats.records).to.equal(2);
    expect(await fileSize(journalFile(dir, 5))).to.equal(size1 + 2 * RECORD_OVERHEAD + 2 * CS);
    await jv2.close();
    const r = await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
    expect(r).to.deep.equal({ generation: 5, generations: [5], chunks: 5, bytes: 4 * CS });
    expect(await sameContent(v, before)).to.equal(true);
  });

  it('an abandoned generation: begin(N+1) keeps the chunks journaled in N saved, rollback replays both', async () => {
    const v = await image();
    const before = v.clone();
    const jv = await open(v.handle(), { committed: 1 });
    await jv.begin(2);
    await jv.write(0, pattern(CS, 100));
    await jv.close();
    const jv2 = await open(v.handle(), { committed: 1 });
    await jv2.begin(3);
    await jv2.write(0, pattern(2 * CS, 101)); // chunk 0 saved in 2, chunk 1 new
    expect(jv2.stats.records).to.equal(1);
    expect(jv2.stats.savedChunks).to.equal(2);
    await jv2.close();
    expect((await listJournals(dir)).map((j) => j.generation)).to.deep.equal([2, 3]);
    const r = await JournaledVolume.rollback(v.handle(), dir, { committed: 1 });
    expect(r).to.deep.equal({ generation: 3, generations: [3, 2], chunks: 2, bytes: 2 * CS });
    expect(await sameContent(v, before)).to.equal(true);
  });

  it('commit deletes the journal; rollback without a journal is a no-op; a journal older than the committed generation is stale', async () => {
    const v = await image();
    const jv = await open(v.handle());
    await jv.begin(1);
    await generation(jv);
    await jv.flush();
    await jv.commit(1);
    expect(await listJournals(dir)).to.deep.equal([]);
    const after1 = v.clone();
    const flushes = v.flushes;
    expect(await JournaledVolume.rollback(v.handle(), dir, { committed: 1 })).to.deep.equal({ generation: null, generations: [], chunks: 0, bytes: 0 });
    expect(await JournaledVolume.rollback(v.handle(), path.join(root, 'nowhere'), { committed: 0 })).to.deep.equal({ generation: null, generations: [], chunks: 0, bytes: 0 });
    expect(v.flushes).to.equal(flushes);

    // Crash between recording committed = 2 and commit(2): journal 2 (base 1) is stale.
    await jv.begin(2);
    await jv.write(0, pattern(CS, 110));
    await jv.flush();
    await jv.close();
    const after2 = v.clone();
    expect(await sameContent(after1, after2)).to.equal(false);
    // With the committed generation still at 1 it is live and rolls back to 1 ...
    await fsp.cp(dir, path.join(root, 'copy-stale1'), { recursive: true });
    await fsp.cp(dir, path.join(root, 'copy-stale2'), { recursive: true });
    const other = v.clone();
    expect(await JournaledVolume.rollback(other, path.join(root, 'copy-stale1'), { committed: 1 })).to.include({ generation: 2 });
    expect(await sameContent(other, after1)).to.equal(true);
    // ... with 2 recorded, it is deleted without replay, by rollback and by open.
    expect(await JournaledVolume.rollback(v.handle(), dir, { committed: 2 })).to.include({ generation: null });
    expect(await sameContent(v, after2)).to.equal(true);
    expect(await listJournals(dir)).to.deep.equal([]);
    dir = path.join(root, 'copy-stale2');
    const jv2 = await open(v.handle(), { committed: 2 });
    expect(await listJournals(dir)).to.deep.equal([]);
    expect(jv2.stats.savedChunks).to.equal(0);
    // A journal newer than what the caller knows as committed is refused.
    await jv2.begin(3);
    await jv2.write(0, pattern(10, 111));
    await jv2.close();
    expect((await rejection(JournaledVolume.rollback(v.handle(), dir, { committed: 1 }))).code).to.equal('TM_ERR_STATE');
    expect((await rejection(open(v.handle(), { committed: 1 }))).code).to.equal('TM_ERR_STATE');
    // Another volume size or chunk size: TM_ERR_STATE, nothing written.
    expect((await rejection(JournaledVolume.rollback(MemoryVolume.create(v.size + CS), dir, { committed: 2 }))).code).to.equal('TM_ERR_STATE');
    expect((await rejection(open(v.handle(), { committed: 2, chunkSize: 2 * CS }))).code).to.equal('TM_ERR_STATE');
    expect((await listJournals(dir)).length).to.equal(1);
  });

  it('a record whose CRC checks but which cannot be right is TM_ERR_STATE, not a torn tail', async () => {
    const v = await image();
    const jv = await open(v.handle());
    await jv.begin(1);
    await jv.write(0, pattern(10, 1));
    await jv.close();
    // Rename gen-1 to gen-7: its records name generation 1.
    await fsp.rename(journalFile(dir, 1), journalFile(dir, 7));
    expect((await rejection(JournaledVolume.rollback(v.handle(), dir, { committed: 0 }))).code).to.equal('TM_ERR_STATE');
  });

  it('on a real sparse file: overwrites, zeros and writes into holes roll back to the same bytes and the same holes', async () => {
    const file = path.join(root, 'target.img');
    const size = 4 * MiB;
    const t = await SparseFileVolume.open(file, { create: { size } });
    await t.write(0, pattern(256 * KiB, 1));
    await t.write(MiB, pattern(CS, 2));
    await t.write(3 * MiB, pattern(512 * KiB, 3));
    await t.flush();
    const bytesBefore = await t.read(0, size);
    const allocBefore = await t.allocated();
    expect(allocBefore).to.deep.equal([
      { offset: 0, length: 256 * KiB },
      { offset: MiB, length: CS },
      { offset: 3 * MiB, length: 512 * KiB },
    ]);
    const jv = await open(t);
    await jv.begin(1);
    await jv.write(100 * KiB, pattern(300 * KiB, 4)); // data and holes
    await jv.zero(MiB, 2 * MiB); // data (chunk 16) and holes (no record)
    await jv.write(2 * MiB + 5, pattern(10, 5)); // a hole
    await jv.zero(3 * MiB + CS, CS); // punched
    await jv.flush();
    expect((await t.read(0, size)).equals(bytesBefore)).to.equal(false);
    await jv.close();

    const t2 = await SparseFileVolume.open(file);
    const r = await JournaledVolume.rollback(t2, dir, { committed: 0 });
    expect(r).to.include({ generation: 1 });
    expect(r.bytes).to.equal(5 * CS); // chunks 1-3, 16, 49 (chunk 0 not touched: the write starts at 100 KiB)
    expect((await t2.read(0, size)).equals(bytesBefore)).to.equal(true);
    expect(await t2.allocated()).to.deep.equal(allocBefore);
    await t2.close();
  });

  /** Chunks covered by the records in `file` (record headers as in journal.ts's file format), head excluded. */
  async function chunksInJournal(file: string): Promise<number[]> {
    const buf = await fsp.readFile(file);
    const out: number[] = [];
    for (let pos = HEAD_BYTES; pos + RECORD_OVERHEAD <= buf.length; ) {
      if (buf.readUInt32LE(pos) !== 0x314a4d54) break;
      const offset = Number(buf.readBigUInt64LE(pos + 16));
      const length = buf.readUInt32LE(pos + 24);
      const payload = buf.readUInt32LE(pos + 28);
      if (pos + RECORD_OVERHEAD + payload > buf.length) break;
      for (let c = offset / CS; c < Math.ceil((offset + length) / CS); c++) out.push(c);
      pos += RECORD_OVERHEAD + payload;
    }
    return out;
  }

  /**
   * A target that checks, at every write and zero, that each chunk it touches
   * is durable in the journal: its record was in the file when an fdatasync
   * started, and that fdatasync has returned (`durable`, kept by the
   * datasync hook). Violations are collected, not thrown.
   */
  class Checked extends Probe {
    readonly durable = new Set<number>();
    readonly violations: string[] = [];
    reads = 0;
    override async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
      const b = await super.read(offset, length, into);
      this.reads++;
      return b;
    }
    private check(what: string, offset: number, length: number): void {
      for (let c = Math.floor(offset / CS); c < Math.ceil((offset + length) / CS); c++) if (!this.durable.has(c)) this.violations.push(`${what} of chunk ${c} before its record was durable`);
    }
    override async write(offset: number, data: Buffer): Promise<void> {
      this.check('write', offset, data.length);
      await super.write(offset, data);
    }
    override async zero(offset: number, length: number): Promise<void> {
      this.check('zero', offset, length);
      await super.zero(offset, length);
    }
  }

  /** `checked`'s datasync hook: the records in the file when the fdatasync starts are durable once it returns; `first` runs before the first one. */
  function durableTracker(checked: Checked, first: () => Promise<void> = async () => {}) {
    let n = 0;
    return async (fh: fsp.FileHandle) => {
      if (n++ === 0) await first();
      const covered = await chunksInJournal(journalFile(dir, 1));
      await fh.datasync();
      for (const c of covered) checked.durable.add(c);
    };
  }

  it('group commit: writes in flight together share one fdatasync, and no chunk is written before an fdatasync that covers its record has returned', async () => {
    const v = await image();
    const before = v.clone();
    const checked = new Checked(v.handle());
    // The first fdatasync is held until every write has read its old content and queued its records.
    const jv = await open(checked, {
      datasync: durableTracker(checked, async () => {
        for (let i = 0; i < 1000 && checked.reads < 6; i++) await new Promise((r) => setImmediate(r)); // bounded: serialized writes never get there
        for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
      }),
    });
    await jv.begin(1);
    const writes: Promise<void>[] = [];
    for (let c = 0; c < 16; c++) writes.push(jv.write(c * CS + 10, pattern(100, c))); // 16 chunks: 6 data (read: 0-3, 6, 9), 10 holes
    await Promise.all(writes);
    expect(jv.stats.records).to.equal(16); // one per call: each call saves its own chunk
    expect(jv.stats.syncs).to.be.at.most(2);
    expect(checked.violations).to.deep.equal([]);
    expect(checked.log.filter((x) => x === 'write')).to.have.length(16);
    await jv.close();
    await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
    expect(await sameContent(v, before)).to.equal(true);
  });

  it('the durability check of the group-commit test catches the broken ordering (negative control)', async () => {
    const v = await image();
    const checked = new Checked(v.handle());
    const jv = await open(checked, { unsafeWriteBeforeJournal: true, datasync: durableTracker(checked) });
    await jv.begin(1);
    await Promise.all([0, 1, 2].map((c) => jv.write(c * CS, pattern(100, c))));
    expect(checked.violations).to.have.length(3);
    await jv.close();
  });

  it('writes in flight on the same chunk are ordered: the old content is saved once, before either lands, and they land in call order', async () => {
    const v = await image();
    const before = v.clone();
    // The first write of chunk 1 is slow: unordered, the later calls on chunk 1 would overtake it.
    class SlowFirst extends Checked {
      slow = true;
      override async write(offset: number, data: Buffer): Promise<void> {
        if (this.slow && Math.floor(offset / CS) === 1) {
          this.slow = false;
          for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
        }
        await super.write(offset, data);
      }
    }
    const checked = new SlowFirst(v.handle());
    const jv = await open(checked, { datasync: durableTracker(checked) });
    await jv.begin(1);
    const ops: [string, number, number | Buffer][] = [
      ['write', CS + 100, pattern(5000, 1)],
      ['write', CS + 2000, pattern(5000, 2)], // overlaps the first
      ['write', 9 * CS, pattern(CS, 3)], // another chunk: not held up
      ['zero', CS + 4000, 100],
      ['write', 0, pattern(CS + 50, 4)], // chunks 0 and 1
    ];
    const expected = v.clone();
    for (const [op, at, x] of ops) await (op === 'write' ? expected.write(at, x as Buffer) : expected.zero(at, x as number));
    await Promise.all(ops.map(([op, at, x]) => (op === 'write' ? jv.write(at, x as Buffer) : jv.zero(at, x as number))));
    expect(checked.violations).to.deep.equal([]);
    expect(await sameContent(v, expected)).to.equal(true);
    expect(jv.stats.savedChunks).to.equal(3); // 0, 1, 9: chunk 1 once
    expect(jv.stats.bytes).to.equal(HEAD_BYTES + 3 * (RECORD_OVERHEAD + CS)); // three data records of one chunk each
    await jv.close();
    await JournaledVolume.rollback(v.handle(), dir, { committed: 0 });
    expect(await sameContent(v, before)).to.equal(true);
  });
});
