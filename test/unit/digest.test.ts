import { expect } from 'chai';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import fc from 'fast-check';
import { chunkDigest, chunkDigests, DIGEST_BYTES, isZeroDigest, UNKNOWN_DIGEST, ZERO_DIGEST } from '../../src/volume/digest.js';
import { native } from '../../src/native/index.js';
import { MemoryVolume } from '../../src/volume/memory.js';
import { SparseFileVolume } from '../../src/volume/sparse-file.js';
import type { ByteRange, Volume } from '../../src/volume/volume.js';
import { digestRange } from '../../src/volume/walk.js';
import { DIGEST_BYTES as WIRE_DIGEST_BYTES } from '../../src/wire/messages.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** What a chunk digest must be, computed independently of chunkDigest. */
function expectedDigest(data: Buffer): Buffer {
  if (data.every((b) => b === 0)) return Buffer.alloc(DIGEST_BYTES);
  return createHash('sha256').update(data).digest().subarray(0, DIGEST_BYTES);
}

/** Digests of [offset, offset + length) from plain reads of each chunk: the reference digestRange must match. */
async function plainDigests(v: Volume, offset: number, length: number, cs: number): Promise<Buffer> {
  const out = Buffer.alloc(Math.ceil(length / cs) * DIGEST_BYTES);
  for (let at = 0, i = 0; at < length; at += cs, i++) {
    chunkDigest(await v.read(offset + at, Math.min(cs, length - at)), out, i * DIGEST_BYTES);
  }
  return out;
}

/** A volume that records the ranges read from it. */
function recording(v: Volume): { volume: Volume; reads: ByteRange[] } {
  const reads: ByteRange[] = [];
  const volume: Volume = {
    path: v.path,
    size: v.size,
    kind: v.kind,
    capabilities: v.capabilities,
    allocated: (a) => v.allocated(a),
    read: (offset, length, into) => {
      reads.push({ offset, length });
      return v.read(offset, length, into);
    },
    write: (o, d) => v.write(o, d),
    zero: (o, l) => v.zero(o, l),
    flush: () => v.flush(),
    close: () => v.close(),
  };
  return { volume, reads };
}

/** Deterministic non-zero bytes. */
function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = (x >>> 16) & 0xff;
  }
  return b;
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => null,
    (e: unknown) => e,
  );
}

describe('chunk digest (volume/digest.ts)', () => {
  it('is SHA-256 truncated to 16 bytes, written at `at`; all-zero content (or none) is the zero digest', () => {
    expect(DIGEST_BYTES).to.equal(16);
    const out = Buffer.alloc(3 * DIGEST_BYTES, 0xaa);
    chunkDigest(Buffer.from('abc'), out, DIGEST_BYTES);
    expect(out.subarray(DIGEST_BYTES, 2 * DIGEST_BYTES).toString('hex')).to.equal('ba7816bf8f01cfea414140de5dae2223');
    expect(out.subarray(0, DIGEST_BYTES).equals(Buffer.alloc(DIGEST_BYTES, 0xaa))).to.equal(true); // neighbours untouched
    expect(out.subarray(2 * DIGEST_BYTES).equals(Buffer.alloc(DIGEST_BYTES, 0xaa))).to.equal(true);
    chunkDigest(Buffer.alloc(64 * KiB), out, 0);
    expect(out.subarray(0, DIGEST_BYTES).equals(ZERO_DIGEST)).to.equal(true);
    chunkDigest(Buffer.alloc(0), out, 2 * DIGEST_BYTES);
    expect(out.subarray(2 * DIGEST_BYTES).equals(ZERO_DIGEST)).to.equal(true);
    expect(ZERO_DIGEST.equals(Buffer.alloc(16))).to.equal(true);
    expect(UNKNOWN_DIGEST.equals(Buffer.alloc(16, 0xff))).to.equal(true);
  });

  it('one byte makes the difference; a single non-zero byte at the end is not zero', () => {
    const a = Buffer.alloc(4 * KiB);
    a[4 * KiB - 1] = 1;
    const d = Buffer.alloc(DIGEST_BYTES);
    chunkDigest(a, d, 0);
    expect(d.equals(expectedDigest(a))).to.equal(true);
    expect(d.equals(ZERO_DIGEST)).to.equal(false);
  });

  it('wire/messages DIGEST_BYTES is the same definition', () => {
    expect(WIRE_DIGEST_BYTES).to.equal(DIGEST_BYTES);
  });
});

describe('chunkDigests(): the digests of every chunk of a buffer on the threadpool (native, OpenSSL)', () => {
  /** chunkDigest of each chunk, one after the other: what chunkDigests must give. */
  function oneByOne(buf: Buffer, cs: number): Buffer {
    const out = Buffer.alloc(Math.ceil(buf.length / cs) * DIGEST_BYTES);
    for (let at = 0, i = 0; at < buf.length; at += cs, i++) chunkDigest(buf.subarray(at, Math.min(at + cs, buf.length)), out, i * DIGEST_BYTES);
    return out;
  }

  it('equals chunkDigest chunk by chunk: data, zero chunks, a short last chunk, a non-zero byte at either end', async () => {
    const cs = 4 * KiB;
    const buf = Buffer.concat([pattern(cs, 1), Buffer.alloc(cs), pattern(cs, 2), Buffer.alloc(cs), Buffer.alloc(cs), pattern(1000, 3)]);
    buf[3 * cs] = 7; // a zero chunk but for its first byte
    buf[5 * cs - 1] = 9; // ... its last byte
    const d = await chunkDigests(buf, cs);
    expect(d.length).to.equal(6 * DIGEST_BYTES);
    expect(d.equals(oneByOne(buf, cs))).to.equal(true);
    expect([0, 1, 2, 3, 4, 5].map((i) => isZeroDigest(d, i))).to.deep.equal([false, true, false, false, false, false]);
    for (let i = 0; i < 6; i++) expect(d.subarray(i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES).equals(expectedDigest(buf.subarray(i * cs, Math.min((i + 1) * cs, buf.length))))).to.equal(true);
    expect((await chunkDigests(Buffer.alloc(0), cs)).length).to.equal(0);
  });

  it('equals chunkDigest for any content and chunk size (property)', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 20000 }), fc.integer({ min: 1, max: 5000 }), fc.boolean(), async (bytes, cs, sparse) => {
        const buf = Buffer.from(bytes);
        if (sparse) for (let i = 0; i < buf.length; i++) if (i % 3 !== 0) buf[i] = 0;
        expect((await chunkDigests(buf, cs)).equals(oneByOne(buf, cs))).to.equal(true);
      }),
      { numRuns: 200 },
    );
  });

  it('refuses an out buffer of the wrong size, overlapping buffers and a bad chunk size', () => {
    const buf = Buffer.alloc(10 * KiB);
    expect(() => native().chunkDigests(buf, 4 * KiB, Buffer.alloc(2 * DIGEST_BYTES))).to.throw(RangeError, /16 bytes per chunk/);
    expect(() => native().chunkDigests(buf, 0, Buffer.alloc(0))).to.throw(RangeError, /chunkSize/);
    expect(() => native().chunkDigests(buf, 1.5, Buffer.alloc(0))).to.throw(RangeError, /chunkSize/);
    expect(() => native().chunkDigests(buf, 4 * KiB, buf.subarray(0, 3 * DIGEST_BYTES))).to.throw(RangeError, /overlap/);
    expect(() => native().chunkDigests('x' as unknown as Buffer, 4 * KiB, Buffer.alloc(0))).to.throw(TypeError);
  });
});

describe('digestRange(): the digests of a range of chunks, holes without reading', () => {
  const CS = 64 * KiB;
  let dir: string;
  before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-digest-'))));
  after(() => rmSync(dir, { recursive: true, force: true }));

  /** Data at chunks 1, 3..4 (zeros written in 4), mid-chunk 7, a 10 MiB run from chunk 16, and the short tail. */
  const SIZE = 16 * CS + 10 * MiB + 3 * CS + 1000;
  const WRITES: [number, Buffer][] = [
    [1 * CS, pattern(CS, 1)],
    [3 * CS, pattern(CS, 3)],
    [4 * CS, Buffer.alloc(CS)],
    [7 * CS + 1000, pattern(100, 7)],
    [16 * CS, pattern(10 * MiB, 16)],
    [SIZE - 500, pattern(500, 99)],
  ];
  async function fill(v: Volume): Promise<void> {
    for (const [off, data] of WRITES) await v.write(off, data);
  }

  it('equals the per-chunk chunkDigest of plain reads, for the whole volume and sub-ranges', async () => {
    const v = MemoryVolume.create(SIZE);
    await fill(v);
    const whole = await digestRange(v, 0, SIZE, CS);
    expect(whole.length).to.equal(Math.ceil(SIZE / CS) * DIGEST_BYTES);
    expect(whole.equals(await plainDigests(v, 0, SIZE, CS))).to.equal(true);
    // Independently of chunkDigest: the last (short) chunk and a chunk of the 10 MiB run.
    const last = Math.ceil(SIZE / CS) - 1;
    expect(whole.subarray(last * DIGEST_BYTES).equals(expectedDigest(await v.read(last * CS, SIZE - last * CS)))).to.equal(true);
    expect(whole.subarray(20 * DIGEST_BYTES, 21 * DIGEST_BYTES).equals(expectedDigest(pattern(10 * MiB, 16).subarray(4 * CS, 5 * CS)))).to.equal(true);
    expect(whole.subarray(4 * DIGEST_BYTES, 5 * DIGEST_BYTES).equals(ZERO_DIGEST)).to.equal(true); // zeros written
    for (const [off, len] of [
      [3 * CS, 5 * CS],
      [17 * CS, 9 * MiB],
      [last * CS, SIZE - last * CS],
      [2 * CS, 0],
    ] as const) {
      expect((await digestRange(v, off, len, CS)).equals(await plainDigests(v, off, len, CS)), `${off}+${len}`).to.equal(true);
    }
  });

  it('reads only allocated chunks, in windows of at most 4 MiB; holes are zero digests', async () => {
    const mem = MemoryVolume.create(SIZE);
    await fill(mem);
    const { volume, reads } = recording(mem);
    const before = mem.reads;
    const d = await digestRange(volume, 0, SIZE, CS);
    const alloc = await mem.allocated(CS);
    expect(mem.reads - before).to.equal(reads.length);
    for (const r of reads) {
      expect(r.length).to.be.at.most(4 * MiB);
      expect(alloc.some((a) => r.offset >= a.offset && r.offset + r.length <= a.offset + a.length), `read ${r.offset}+${r.length} inside the map`).to.equal(true);
    }
    // 1, 3..4, 7: three runs of one read each; the 10 MiB run in 4 + 4 + 2 MiB; the tail chunk.
    expect(reads.map((r) => r.length)).to.deep.equal([CS, 2 * CS, CS, 4 * MiB, 4 * MiB, 2 * MiB, SIZE - (16 * CS + 10 * MiB + 3 * CS)].filter((n) => n > 0));
    for (const c of [0, 2, 5, 6, 8, 15]) expect(d.subarray(c * DIGEST_BYTES, (c + 1) * DIGEST_BYTES).equals(ZERO_DIGEST), `chunk ${c}`).to.equal(true);
  });

  it('an all-hole range reads nothing; a given map is used as is', async () => {
    const v = MemoryVolume.create(SIZE);
    await fill(v);
    const before = v.reads;
    const d = await digestRange(v, 8 * CS, 8 * CS, CS);
    expect(v.reads).to.equal(before);
    expect(d.equals(Buffer.alloc(8 * DIGEST_BYTES))).to.equal(true);
    // Told that nothing is allocated: all zero digests, nothing read (what a thin snapshot's map can say).
    const none = await digestRange(v, 0, 8 * CS, CS, []);
    expect(v.reads).to.equal(before);
    expect(none.equals(Buffer.alloc(8 * DIGEST_BYTES))).to.equal(true);
  });

  it('an offset off a chunk boundary is TM_ERR_INTERNAL; outside the volume TM_ERR_VOLUME_RANGE', async () => {
    const v = MemoryVolume.create(4 * CS);
    expect(await rejection(digestRange(v, 100, CS, CS))).to.have.property('code', 'TM_ERR_INTERNAL');
    expect(await rejection(digestRange(v, 0, 5 * CS, CS))).to.have.property('code', 'TM_ERR_VOLUME_RANGE');
    expect(await rejection(digestRange(v, 0, -CS, CS))).to.have.property('code', 'TM_ERR_VOLUME_RANGE');
    expect(await rejection(digestRange(v, 0, CS, CS, [{ offset: 100, length: 10 }]))).to.have.property('code', 'TM_ERR_INTERNAL');
  });

  it('a sparse file and a memory volume with the same content give the same digests', async () => {
    const file = await SparseFileVolume.open(path.join(dir, 'same.img'), { create: { size: SIZE } });
    const mem = MemoryVolume.create(SIZE);
    try {
      await fill(file);
      await fill(mem);
      await file.zero(3 * CS, CS); // a punched hole in both
      await mem.zero(3 * CS, CS);
      const a = await digestRange(file, 0, SIZE, CS);
      const b = await digestRange(mem, 0, SIZE, CS);
      expect(a.equals(b)).to.equal(true);
      expect(a.equals(await plainDigests(mem, 0, SIZE, CS))).to.equal(true);
      expect(a.subarray(3 * DIGEST_BYTES, 4 * DIGEST_BYTES).equals(ZERO_DIGEST)).to.equal(true);
      expect(a.subarray(1 * DIGEST_BYTES, 2 * DIGEST_BYTES).equals(expectedDigest(pattern(CS, 1)))).to.equal(true);
      // One byte changed on one side only: exactly that chunk differs.
      const byte = (await mem.read(20 * CS + 5, 1))[0]!;
      await mem.write(20 * CS + 5, Buffer.from([byte ^ 0xff]));
      const c = await digestRange(mem, 0, SIZE, CS);
      const differing: number[] = [];
      for (let i = 0; i * DIGEST_BYTES < a.length; i++) if (a.compare(c, i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES, i * DIGEST_BYTES, (i + 1) * DIGEST_BYTES) !== 0) differing.push(i);
      expect(differing).to.deep.equal([20]);
    } finally {
      await file.close();
    }
  });
});
