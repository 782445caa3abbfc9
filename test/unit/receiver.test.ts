import { expect } from 'chai';
import { Receiver, type ReplicaRecord } from '../../src/mirror/receiver.js';
import type { Applying } from '../../src/mirror/state.js';
import { MemoryVolume } from '../../src/volume/memory.js';
import { memorySessionPair } from '../../src/wire/memory.js';
import type { Session } from '../../src/wire/session.js';
import { makeDataExtent } from '../../src/wire/payload.js';

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
  it('applies a generation, acknowledges each extent, flushes and records the commit before answering committed', async () => {
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
    const got = [await a.next(1000), await a.next(1000), await a.next(1000)];
    expect(got.map((m) => m.type)).to.deep.equal(['ack', 'ack', 'committed']);
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
});
