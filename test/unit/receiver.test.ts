import { expect } from 'chai';
import { DelegatingVolume } from '../helpers/delegating-volume.js';
import { Receiver, type ReplicaRecord } from '../../src/mirror/receiver.js';
import type { Applying } from '../../src/mirror/state.js';
import { MemoryVolume } from '../../src/volume/memory.js';
import { memorySessionPair } from '../../src/wire/memory.js';
import type { Session } from '../../src/wire/session.js';
import { makeDataExtent } from '../../src/wire/payload.js';
import type { Message } from '../../src/wire/messages.js';

const silent = { info() {}, warn() {} };

type Record = { -readonly [K in keyof ReplicaRecord]: ReplicaRecord[K] } & { saves: string[] };

function record(): Record {
  const r = {
    committedGeneration: 0,
    applying: null as Applying | null,
    saves: [] as string[],
    async begin(gen: number, resumeFrom: number) {
      if (!r.applying || r.applying.generation !== gen) await r.saveApplying({ generation: gen, cursor: resumeFrom });
    },
    async saveApplying(a: Applying) {
      r.applying = a;
      r.saves.push(`applying ${a.generation}@${a.cursor}`);
    },
    async saveCommitted(gen: number) {
      r.committedGeneration = gen;
      r.applying = null;
      r.saves.push(`committed ${gen}`);
    },
  };
  return r;
}

/**
 * A target whose writes wait until the test releases them (by offset), so
 * that extents complete out of order; it counts the writes in flight, and
 * can fail the write at one offset.
 */
class Gated extends DelegatingVolume {
  inFlight = 0;
  maxInFlight = 0;
  failAt: number | null = null;
  private readonly gates = new Map<number, () => void>();
  private readonly opened = new Set<number>();
  /** Let the write at `offset` proceed (now, or as soon as it comes). */
  release(offset: number): void {
    this.opened.add(offset);
    this.gates.get(offset)?.();
  }
  /** Resolves once `n` writes are waiting at their gate. */
  async waiting(n: number): Promise<void> {
    while (this.gates.size < n) await new Promise((r) => setImmediate(r));
  }
  /** Resolves once exactly the writes at `offsets` are waiting at their gate and no other write is in flight. */
  async waitingAt(offsets: number[]): Promise<void> {
    const want = [...offsets].sort((x, y) => x - y).join();
    while ([...this.gates.keys()].sort((x, y) => x - y).join() !== want || this.inFlight !== offsets.length) await new Promise((r) => setImmediate(r));
  }
  override async write(offset: number, data: Buffer): Promise<void> {
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      if (!this.opened.has(offset)) await new Promise<void>((r) => this.gates.set(offset, r));
      this.gates.delete(offset);
      if (offset === this.failAt) throw new Error(`EIO: injected at ${offset}`);
      await this.inner.write(offset, data);
    } finally {
      this.inFlight--;
    }
  }
  override zero(offset: number, length: number): Promise<void> {
    return this.inner.zero(offset, length);
  }
  override flush(): Promise<void> {
    return this.inner.flush();
  }
  override close(): Promise<void> {
    return this.inner.close();
  }
}

/** A Receiver on `b` with checkpoints only at commits. */
function receiver(b: Session, target: MemoryVolume, rec: ReplicaRecord): Receiver {
  return new Receiver(b, target, rec, { chunkSize: 4096, checkpointBytes: 1 << 30, checkpointInterval: 60, what: 'test', log: silent });
}

function open(size: number) {
  const link = memorySessionPair();
  for (const s of [link.a, link.b]) {
    s.ctx.volumeSize = size;
    s.ctx.chunkSize = 4096;
  }
  return link;
}

describe('Receiver (mirror/receiver) over an in-memory session', () => {
  it('applies a generation, acknowledges the extents (cumulative acks), flushes and records the commit before answering committed', async () => {
    const size = 64 * 1024;
    const target = MemoryVolume.create(size);
    const rec = record();
    const { a, b } = open(size);
    const run = receiver(b, target, rec).run();
    run.catch(() => {});
    const data = Buffer.alloc(8192, 7);
    a.send({ type: 'begin', generation: 1, resumeFrom: 0 });
    a.send(await makeDataExtent(1, 0, data));
    a.send({ type: 'extent', seq: 2, kind: 'trim', offset: 8192, length: size - 8192 });
    a.send({ type: 'commit', generation: 1 });
    const got: Message[] = [];
    do got.push(await a.next(1000));
    while (got[got.length - 1]!.type !== 'committed');
    // Acks are cumulative: one or two of them, the last for extent 2, before committed.
    const acks = got.filter((m) => m.type === 'ack').map((m) => (m as { seq: number }).seq);
    expect(acks[acks.length - 1]).to.equal(2);
    expect(got.map((m) => m.type)).to.deep.equal([...acks.map(() => 'ack'), 'committed']);
    expect(rec.saves).to.deep.equal(['applying 1@0', 'committed 1']);
    expect(target.flushes).to.be.at.least(1);
    expect((await target.read(0, 8192)).equals(data)).to.equal(true);
    a.close();
    await run.then(
      () => expect.fail('run() only ends with the session'),
      (e) => expect(e.code).to.equal('TM_ERR_CONNECTION'),
    );
  });

  it('regression: a session that ends while the commit is still queued leaves the generation committed, not "applying" again', async () => {
    // Found by the role-change unit test: the commit was recorded, sending
    // `committed` failed on the closed session, and the end-of-session
    // checkpoint then recorded the committed generation as partly applied.
    const size = 64 * 1024;
    const target = MemoryVolume.create(size);
    const rec = record();
    // The commit's save takes a while, as on a disk: the session ends meanwhile.
    const save = rec.saveCommitted;
    rec.saveCommitted = async (gen) => {
      await new Promise((r) => setTimeout(r, 20));
      await save(gen);
    };
    // The link is cut when the secondary acknowledges the extent: the commit is already queued on its side.
    const link = memorySessionPair({ onFrame: (from) => (from === 'b' ? 'cut' : 'pass') });
    for (const s of [link.a, link.b]) {
      s.ctx.volumeSize = size;
      s.ctx.chunkSize = 4096;
    }
    const { a, b } = link;
    a.send({ type: 'begin', generation: 1, resumeFrom: 0 });
    a.send(await makeDataExtent(1, 0, Buffer.alloc(4096, 1)));
    a.send({ type: 'commit', generation: 1 });
    const err = await receiver(b, target, rec).run().catch((e) => e);
    expect(err.code).to.equal('TM_ERR_CONNECTION');
    expect(rec.committedGeneration).to.equal(1);
    expect(rec.applying).to.equal(null);
    expect(rec.saves).to.deep.equal(['applying 1@0', 'committed 1']);
  });

  it('a bad checksum ends the session with TM_ERR_CHECKSUM and writes nothing of that extent', async () => {
    const size = 64 * 1024;
    const target = MemoryVolume.create(size);
    const rec = record();
    const { a, b } = open(size);
    const run = receiver(b, target, rec).run();
    a.send({ type: 'begin', generation: 1, resumeFrom: 0 });
    const ext = await makeDataExtent(1, 0, Buffer.alloc(4096, 9));
    a.send({ ...ext, crc32c: (ext.crc32c! ^ 1) >>> 0 });
    const err = await run.catch((e) => e);
    expect(err.code).to.equal('TM_ERR_CHECKSUM');
    expect((await target.allocated()).length).to.equal(0);
  });

  it('a resume beyond what is durable here is refused (TM_ERR_PROTOCOL)', async () => {
    const size = 64 * 1024;
    const rec = record();
    rec.applying = { generation: 1, cursor: 4096 };
    const { a, b } = open(size);
    const run = receiver(b, MemoryVolume.create(size), rec).run();
    a.send({ type: 'begin', generation: 1, resumeFrom: 8192 });
    const err = await run.catch((e) => e);
    expect(err.code).to.equal('TM_ERR_PROTOCOL');
    expect(err.message).to.match(/resumes from 8192, but only generation 1 up to 4096 is durable here/);
  });

  it('extent numbers that do not go up are refused (TM_ERR_PROTOCOL): a cumulative ack would cover an extent not written', async () => {
    const size = 64 * 1024;
    const target = MemoryVolume.create(size);
    const { a, b } = open(size);
    const run = receiver(b, target, record()).run();
    a.send({ type: 'begin', generation: 1, resumeFrom: 0 });
    a.send(await makeDataExtent(5, 0, Buffer.alloc(4096, 1)));
    a.send(await makeDataExtent(5, 4096, Buffer.alloc(4096, 2)));
    const err = await run.catch((e) => e);
    expect(err.code).to.equal('TM_ERR_PROTOCOL');
    expect(err.message).to.match(/extent 5 at 4096 after extent 5: extent numbers must go up/);
    // Nothing of the refused extent was written.
    expect(await target.allocated(undefined, { offset: 4096, length: 4096 })).to.deep.equal([]);
  });

  it('applies several extents at once, acknowledges them in order, and a checkpoint never covers an extent whose write (or an earlier one) has not completed', async () => {
    const CHUNK = 4096;
    const size = 16 * CHUNK;
    const inner = MemoryVolume.create(size);
    const target = new Gated(inner);
    const rec = record();
    // A checkpoint after every extent: each must cover only extents whose writes completed, all of them below its cursor.
    const checked: number[] = [];
    const save = rec.saveApplying.bind(rec);
    rec.saveApplying = async (a: Applying) => {
      for (let at = 0; at < a.cursor; at += CHUNK) expect((await inner.read(at, CHUNK)).equals(Buffer.alloc(CHUNK, 1 + at / CHUNK)), `chunk at ${at} below cursor ${a.cursor}`).to.equal(true);
      checked.push(a.cursor);
      await save(a);
    };
    const { a, b } = open(size);
    const run = new Receiver(b, target, rec, { chunkSize: CHUNK, checkpointBytes: 1, checkpointInterval: 60, what: 'test', log: silent, maxApplies: 4 }).run();
    run.catch(() => {});
    a.send({ type: 'begin', generation: 1, resumeFrom: 0 });
    for (let i = 0; i < 6; i++) a.send(await makeDataExtent(i + 1, i * CHUNK, Buffer.alloc(CHUNK, 1 + i)));
    a.send({ type: 'commit', generation: 1 });
    // Four writes in flight at once (maxApplies), none released yet: the fifth extent waits for room.
    await target.waiting(4);
    expect(target.maxInFlight).to.equal(4);
    // Complete them out of order: 2, 3, 4 first. Nothing may be acknowledged or checkpointed past extent 1
    // (and the window stays full: room is made by acknowledged extents, so 5 and 6 wait).
    for (const i of [1, 2, 3]) target.release(i * CHUNK);
    await target.waitingAt([0]);
    for (const i of [1, 2, 3]) expect((await inner.read(i * CHUNK, CHUNK)).equals(Buffer.alloc(CHUNK, 1 + i))).to.equal(true);
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
    expect(rec.saves).to.deep.equal(['applying 1@0']);
    expect(target.maxInFlight).to.equal(4);
    for (const i of [0, 4, 5]) target.release(i * CHUNK);
    const got: Message[] = [];
    for (;;) {
      const m = await a.next(5000);
      got.push(m);
      if (m.type === 'committed') break;
    }
    // Extents 2-4 were written before 1: the ack after 1's write covers all four (acks are cumulative); then 5 and 6.
    const acks = got.filter((m) => m.type === 'ack').map((m) => (m as { seq: number }).seq);
    expect(acks[0]).to.equal(4);
    expect(acks[acks.length - 1]).to.equal(6);
    expect(acks, 'acks go forward').to.deep.equal([...new Set(acks)].sort((x, y) => x - y));
    for (const m of got) if (m.type === 'ack') expect(m.durable % CHUNK).to.equal(0);
    expect(checked.length).to.be.greaterThan(0);
    expect(rec.saves[rec.saves.length - 1]).to.equal('committed 1');
    for (let i = 0; i < 6; i++) expect((await inner.read(i * CHUNK, CHUNK)).equals(Buffer.alloc(CHUNK, 1 + i))).to.equal(true);
    a.close();
    await run.catch(() => {});
  });

  it('a failed write among several in flight ends the session with TM_ERR_VOLUME_IO; the end-of-session checkpoint stops before it, even if later writes completed', async () => {
    const CHUNK = 4096;
    const size = 16 * CHUNK;
    const inner = MemoryVolume.create(size);
    const target = new Gated(inner);
    target.failAt = 2 * CHUNK;
    const rec = record();
    const { a, b } = open(size);
    const run = new Receiver(b, target, rec, { chunkSize: CHUNK, checkpointBytes: 1 << 30, checkpointInterval: 60, what: 'test', log: silent, maxApplies: 8 }).run();
    a.send({ type: 'begin', generation: 1, resumeFrom: 0 });
    for (let i = 0; i < 5; i++) a.send(await makeDataExtent(i + 1, i * CHUNK, Buffer.alloc(CHUNK, 1 + i)));
    await target.waiting(5);
    for (const i of [0, 1, 3, 4]) target.release(i * CHUNK);
    await new Promise((r) => setImmediate(r));
    target.release(2 * CHUNK);
    const err = await run.catch((e) => e);
    expect(err.code).to.equal('TM_ERR_VOLUME_IO');
    expect(err.message).to.match(/injected at 8192/);
    expect(rec.applying).to.deep.equal({ generation: 1, cursor: 2 * CHUNK });
    expect((await inner.read(4 * CHUNK, CHUNK)).equals(Buffer.alloc(CHUNK, 5))).to.equal(true); // written, but not claimed durable
  });
});
