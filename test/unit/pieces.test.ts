import { expect } from 'chai';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeFileSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import * as os from 'node:os';
import * as path from 'node:path';
import { native, type NativeOps } from '../../src/native/index.js';
import { MemoryVolume } from '../../src/volume/memory.js';
import { readPieces, totalLength, writePieces } from '../../src/volume/pieces.js';
import { SparseFileVolume } from '../../src/volume/sparse-file.js';
import type { ByteRange, Volume } from '../../src/volume/volume.js';
import { DelegatingVolume } from '../helpers/delegating-volume.js';
import { rejection } from '../helpers/rejection.js';
import { prng } from '../../src/util/sample.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function randomBytes(n: number): Buffer {
  return randomFillSync(Buffer.allocUnsafe(n));
}

/** Sizes from 1 B to 1 MiB, mostly small (a 1 MiB piece about one time in 100). */
const SIZES = [1, 3, 100, 511, 4096, 4097, 12 * KiB + 5, 64 * KiB, 200 * KiB + 1];

/**
 * `count` ascending, non-overlapping pieces of mixed sizes with gaps (0 to 64 KiB) between
 * them, inside `size` bytes.
 */
function scatter(count: number, size: number, seed: number): ByteRange[] {
  const rnd = prng(seed);
  const out: ByteRange[] = [];
  let at = Math.floor(rnd() * 4096);
  for (let i = 0; i < count; i++) {
    const length = count > 2 && i % 100 === 7 ? 1 * MiB : count <= 2 && i === 1 ? 1 * MiB : SIZES[Math.floor(rnd() * SIZES.length)]!;
    expect(at + length, 'the pieces fit in the file').to.be.at.most(size);
    out.push({ offset: at, length });
    at += length + (i % 3 === 0 ? 0 : Math.floor(rnd() * 64 * KiB)); // some pieces touch the next one
  }
  return out;
}

const f64 = (pieces: readonly ByteRange[], k: 'offset' | 'length') => Float64Array.from(pieces, (p) => p[k]);

describe('batched I/O of scattered pieces (preadPieces / pwritePieces, Volume.readPieces / writePieces)', () => {
  let dir: string;
  let n = 0;
  const file = () => path.join(dir, `p${n++}.img`);
  before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-pieces-'))));
  after(() => rmSync(dir, { recursive: true, force: true }));

  /** A file of `size` random bytes; its content. */
  function randomFile(size: number): { f: string; content: Buffer } {
    const f = file();
    const content = randomBytes(size);
    writeFileSync(f, content);
    return { f, content };
  }

  describe('native addon', () => {
    const FILE_SIZE = 64 * MiB;
    let src: { f: string; content: Buffer };
    before(() => (src = randomFile(FILE_SIZE)));

    for (const count of [1, 2, 1000]) {
      it(`preadPieces of ${count} scattered piece(s) packs what readSync reads at each offset, and nothing past them`, async () => {
        const pieces = scatter(count, FILE_SIZE, 100 + count);
        const total = totalLength(pieces);
        const into = Buffer.alloc(total + 64, 0xee);
        const fd = openSync(src.f, 'r');
        try {
          await native().preadPieces(fd, f64(pieces, 'offset'), f64(pieces, 'length'), into);
          let at = 0;
          for (const p of pieces) {
            const want = Buffer.alloc(p.length);
            expect(readSync(fd, want, 0, p.length, p.offset)).to.equal(p.length);
            expect(into.subarray(at, at + p.length).equals(want), `piece at ${p.offset}+${p.length} packed at ${at}`).to.equal(true);
            at += p.length;
          }
          expect(into.subarray(total).equals(Buffer.alloc(64, 0xee)), 'bytes past the total untouched').to.equal(true);
        } finally {
          closeSync(fd);
        }
      });

      it(`pwritePieces of ${count} scattered piece(s) writes data's consecutive bytes there and nothing elsewhere`, async () => {
        const { f, content } = randomFile(FILE_SIZE);
        const pieces = scatter(count, FILE_SIZE, 200 + count);
        const data = randomBytes(totalLength(pieces));
        const expected = Buffer.from(content);
        let at = 0;
        for (const p of pieces) {
          data.copy(expected, p.offset, at, at + p.length);
          at += p.length;
        }
        const fd = openSync(f, 'r+');
        try {
          await native().pwritePieces(fd, f64(pieces, 'offset'), f64(pieces, 'length'), data);
        } finally {
          closeSync(fd);
        }
        const got = readFileSync(f);
        expect(got.length).to.equal(FILE_SIZE);
        expect(got.equals(expected)).to.equal(true);
      });
    }

    it('reading past the end of the file rejects with EOF_SHORT naming the offset; a piece wholly past it too', async () => {
      const { f } = randomFile(10_000);
      const fd = openSync(f, 'r');
      try {
        const e = await native()
          .preadPieces(fd, Float64Array.of(0, 9990), Float64Array.of(10, 20), Buffer.alloc(30))
          .then(() => expect.fail('resolved'), (x: NodeJS.ErrnoException & { position?: number }) => x);
        expect(e).to.include({ code: 'EOF_SHORT', syscall: 'pread', position: 10_000 });
        expect(e.message).to.contain('10000');
        const e2 = await native()
          .preadPieces(fd, Float64Array.of(0, 20_000), Float64Array.of(10, 1), Buffer.alloc(11))
          .then(() => expect.fail('resolved'), (x: NodeJS.ErrnoException) => x);
        expect(e2).to.include({ code: 'EOF_SHORT', position: 20_000 });
        // Zero pieces, and zero-length pieces past the end, read nothing and succeed.
        await native().preadPieces(fd, new Float64Array(0), new Float64Array(0), Buffer.alloc(0));
        await native().preadPieces(fd, Float64Array.of(50_000), Float64Array.of(0), Buffer.alloc(0));
      } finally {
        closeSync(fd);
      }
    });

    it('pwritePieces on a read-only descriptor rejects with EBADF (errno, syscall); preadPieces on a bad fd too', async () => {
      const { f, content } = randomFile(64 * KiB);
      const fd = openSync(f, 'r');
      try {
        const e = await native()
          .pwritePieces(fd, Float64Array.of(0, 8192), Float64Array.of(4, 4), Buffer.alloc(8, 1))
          .then(() => expect.fail('resolved'), (x: NodeJS.ErrnoException & { position?: number }) => x);
        expect(e).to.include({ code: 'EBADF', syscall: 'pwrite', position: 0 });
        expect(e.errno).to.be.a('number');
        expect(e.message).to.contain('pwrite failed');
      } finally {
        closeSync(fd);
      }
      expect(readFileSync(f).equals(content)).to.equal(true);
      const e = await native()
        .preadPieces(99999, Float64Array.of(0), Float64Array.of(1), Buffer.alloc(1))
        .then(() => expect.fail('resolved'), (x: NodeJS.ErrnoException) => x);
      expect(e).to.include({ code: 'EBADF', syscall: 'pread' });
    });

    it('arguments are validated synchronously: TypeError for types, RangeError for values', () => {
      const ops = native();
      const one = Float64Array.of(0);
      const buf = Buffer.alloc(8);
      const call = (...a: unknown[]) => () => (ops.preadPieces as (...x: unknown[]) => Promise<void>)(...a);
      const wcall = (...a: unknown[]) => () => (ops.pwritePieces as (...x: unknown[]) => Promise<void>)(...a);
      expect(call('3', one, one, buf)).to.throw(TypeError, /preadPieces\(fd/);
      expect(call(3, [0], one, buf)).to.throw(TypeError);
      expect(call(3, one, new Float32Array(1), buf)).to.throw(TypeError);
      expect(call(3, one, one, new Float64Array(1))).to.throw(TypeError);
      expect(call(3, one, one)).to.throw(TypeError);
      expect(wcall(3, one, one, 'data')).to.throw(TypeError, /pwritePieces\(fd/);
      expect(call(-1, one, one, buf)).to.throw(RangeError);
      expect(call(1.5, one, one, buf)).to.throw(RangeError);
      expect(call(3, Float64Array.of(0, 1), one, buf)).to.throw(RangeError, /2 positions but 1 lengths/);
      expect(call(3, Float64Array.of(-1), one, buf)).to.throw(RangeError, /piece 0/);
      expect(call(3, Float64Array.of(0.5), one, buf)).to.throw(RangeError);
      expect(call(3, Float64Array.of(NaN), one, buf)).to.throw(RangeError);
      expect(call(3, Float64Array.of(2 ** 60), one, buf)).to.throw(RangeError);
      expect(call(3, Float64Array.of(0, 8), Float64Array.of(4, -4), buf)).to.throw(RangeError, /piece 1/);
      expect(call(3, Float64Array.of(0, 8), Float64Array.of(4, 5), buf)).to.throw(RangeError, /more than the 8 bytes of into/);
      expect(wcall(3, Float64Array.of(0), Float64Array.of(9), buf)).to.throw(RangeError, /8 bytes of data/);
      const many = new Float64Array((1 << 20) + 1);
      expect(call(3, many, many, buf)).to.throw(RangeError, /at most 1048576/);
    });
  });

  describe('volumes', () => {
    it('SparseFileVolume: writePieces then readPieces round trip, each piece as read() reads it, the gaps untouched (zeros)', async () => {
      const size = 40 * MiB;
      const v = await SparseFileVolume.open(file(), { create: { size } });
      try {
        const pieces = scatter(300, size, 7);
        const total = totalLength(pieces);
        const data = randomBytes(total);
        await v.writePieces(pieces, data);
        let at = 0;
        let gapFrom = 0;
        for (const p of pieces) {
          expect((await v.read(p.offset, p.length)).equals(data.subarray(at, at + p.length)), `piece at ${p.offset}`).to.equal(true);
          if (p.offset > gapFrom) expect((await v.read(gapFrom, p.offset - gapFrom)).equals(Buffer.alloc(p.offset - gapFrom)), `gap at ${gapFrom}`).to.equal(true);
          gapFrom = p.offset + p.length;
          at += p.length;
        }
        const into = Buffer.alloc(total + 10, 0xee);
        const got = await v.readPieces(pieces, into);
        expect(got.length).to.equal(total);
        expect(got.buffer).to.equal(into.buffer);
        expect(got.equals(data)).to.equal(true);
        expect(into.subarray(total).equals(Buffer.alloc(10, 0xee))).to.equal(true);
        // The helper takes the volume's own method; one piece and no piece work too.
        expect((await readPieces(v, pieces, Buffer.alloc(total))).equals(data)).to.equal(true);
        expect((await v.readPieces([pieces[5]!], Buffer.alloc(pieces[5]!.length + 3))).equals(data.subarray(totalLength(pieces.slice(0, 5)), totalLength(pieces.slice(0, 6))))).to.equal(true);
        expect(await v.readPieces([], Buffer.alloc(4))).to.have.length(0);
      } finally {
        await v.close();
      }
    });

    it('writePieces leaves the holes between pieces holes (allocation map = the pieces)', async () => {
      const v = await SparseFileVolume.open(file(), { create: { size: 16 * MiB } });
      try {
        const pieces = [
          { offset: 1 * MiB, length: 4 * KiB },
          { offset: 3 * MiB, length: 64 * KiB },
          { offset: 3 * MiB + 64 * KiB, length: 8 * KiB }, // touches the previous one
          { offset: 7 * MiB + 8 * KiB, length: 12 * KiB },
          { offset: 16 * MiB - 4 * KiB, length: 4 * KiB },
        ];
        await v.writePieces(pieces, randomBytes(totalLength(pieces)));
        expect(await v.allocated()).to.deep.equal([
          { offset: 1 * MiB, length: 4 * KiB },
          { offset: 3 * MiB, length: 72 * KiB },
          { offset: 7 * MiB + 8 * KiB, length: 12 * KiB },
          { offset: 16 * MiB - 4 * KiB, length: 4 * KiB },
        ]);
      } finally {
        await v.close();
      }
    });

    it('range, order, size and state errors are TmErrors with a code; a volume that shrank is TM_ERR_VOLUME_IO', async () => {
      const f = file();
      const v = await SparseFileVolume.open(f, { create: { size: 1 * MiB } });
      const ro = await SparseFileVolume.open(f, { readOnly: true });
      try {
        const two = [{ offset: 0, length: 10 }, { offset: 1 * MiB - 10, length: 20 }];
        expect((await rejection(v.readPieces(two, Buffer.alloc(30)))).code).to.equal('TM_ERR_VOLUME_RANGE');
        expect((await rejection(v.writePieces(two, Buffer.alloc(30)))).code).to.equal('TM_ERR_VOLUME_RANGE');
        expect((await rejection(v.writePieces([{ offset: -1, length: 1 }, { offset: 5, length: 1 }], Buffer.alloc(2)))).code).to.equal('TM_ERR_VOLUME_RANGE');
        const unordered = [{ offset: 100, length: 10 }, { offset: 105, length: 10 }];
        expect((await rejection(v.writePieces(unordered, Buffer.alloc(20)))).code).to.equal('TM_ERR_VOLUME_RANGE');
        expect((await rejection(writePieces(v, unordered, Buffer.alloc(20)))).code).to.equal('TM_ERR_VOLUME_RANGE');
        const ok = [{ offset: 0, length: 10 }, { offset: 100, length: 10 }];
        expect((await rejection(v.writePieces(ok, Buffer.alloc(21)))).code).to.equal('TM_ERR_INTERNAL');
        expect((await rejection(writePieces(v, ok, Buffer.alloc(19)))).code).to.equal('TM_ERR_INTERNAL');
        expect((await rejection(readPieces(v, ok, Buffer.alloc(19)))).code).to.equal('TM_ERR_INTERNAL');
        expect((await rejection(v.readPieces(ok, Buffer.alloc(19)))).code).to.equal('TM_ERR_INTERNAL');
        expect((await rejection(ro.writePieces(ok, Buffer.alloc(20)))).code).to.equal('TM_ERR_VOLUME_IO');
        // The file shrinks under the volume: the read ends early.
        const fd = openSync(f, 'r+');
        ftruncateSync(fd, 512 * KiB);
        closeSync(fd);
        const e = await rejection(v.readPieces([{ offset: 0, length: 10 }, { offset: 510 * KiB, length: 10 * KiB }], Buffer.alloc(10 + 10 * KiB)));
        expect(e.code).to.equal('TM_ERR_VOLUME_IO');
        expect(e.message).to.contain(f).and.contain('ended at 524288,').and.contain('did it shrink?').and.contain('2 pieces from 0..');
        expect(e.message).to.match(/ended at 524288, expected 1048576 bytes/);
      } finally {
        await v.close();
        await ro.close();
      }
      expect((await rejection(v.readPieces([{ offset: 0, length: 1 }, { offset: 5, length: 1 }], Buffer.alloc(2)))).code).to.equal('TM_ERR_VOLUME_IO');
    });

    it('a native error becomes TM_ERR_NO_SPACE / TM_ERR_VOLUME_IO naming the file and the pieces (test double)', async () => {
      const fail = (code: string) => async () => {
        throw Object.assign(new Error(`pwrite failed: ${code}`), { code, syscall: 'pwrite' });
      };
      const f = file();
      const full = await SparseFileVolume.open(f, { create: { size: 1 * MiB }, ops: { ...native(), pwritePieces: fail('ENOSPC'), preadPieces: fail('EIO') } });
      try {
        const pieces = [{ offset: 0, length: 1 }, { offset: 4096, length: 2 }];
        const e = await rejection(full.writePieces(pieces, Buffer.alloc(3)));
        expect(e.code).to.equal('TM_ERR_NO_SPACE');
        expect(e.message).to.contain(f);
        const r = await rejection(full.readPieces(pieces, Buffer.alloc(3)));
        expect(r.code).to.equal('TM_ERR_VOLUME_IO');
        expect(r.message).to.contain(`reading ${f}: 2 pieces from 0..4098`);
      } finally {
        await full.close();
      }
    });

    it('the pieces.ts fallback (MemoryVolume, and a volume whose read ignores `into`) gives the same bytes as the file', async () => {
      const size = 24 * MiB;
      const pieces = scatter(200, size, 11);
      const data = randomBytes(totalLength(pieces));
      const mem = MemoryVolume.create(size);
      const sf = await SparseFileVolume.open(file(), { create: { size } });
      try {
        expect((mem as Volume).readPieces, 'MemoryVolume has no readPieces: the fallback is what runs').to.equal(undefined);
        await writePieces(mem, pieces, data);
        await writePieces(sf, pieces, data);
        let at = 0;
        for (const p of pieces) {
          expect((await mem.read(p.offset, p.length)).equals(data.subarray(at, at + p.length))).to.equal(true);
          at += p.length;
        }
        const fromMem = await readPieces(mem, pieces, Buffer.alloc(data.length + 5, 0xee));
        expect(fromMem.equals(data)).to.equal(true);
        expect((await readPieces(sf, pieces, Buffer.alloc(data.length))).equals(fromMem)).to.equal(true);
        // A volume whose read returns a buffer of its own: the helper copies it into place.
        class OwnBuffers extends DelegatingVolume {
          override read(offset: number, length: number): Promise<Buffer> {
            return this.inner.read(offset, length);
          }
        }
        const into = Buffer.alloc(data.length);
        const got = await readPieces(new OwnBuffers(mem), pieces, into);
        expect(got.buffer).to.equal(into.buffer);
        expect(got.equals(data)).to.equal(true);
      } finally {
        await sf.close();
      }
    });

    it('a list longer than one native call (2^20 pieces) is split in calls whose bytes follow each other', async () => {
      const count = (1 << 20) + 3;
      const size = 2 * count + 10;
      const calls: number[] = [];
      const real = native();
      const ops: NativeOps = {
        ...real,
        pwritePieces: (fd, pos, len, data) => (calls.push(pos.length), real.pwritePieces(fd, pos, len, data)),
        preadPieces: (fd, pos, len, into) => (calls.push(pos.length), real.preadPieces(fd, pos, len, into)),
      };
      const f = file();
      const v = await SparseFileVolume.open(f, { create: { size }, ops });
      try {
        const pieces = Array.from({ length: count }, (_, i) => ({ offset: 2 * i + 1, length: 1 }));
        const data = Buffer.from(Array.from({ length: count }, (_, i) => (i * 7 + 1) & 0xff || 1));
        await v.writePieces(pieces, data);
        expect(calls).to.deep.equal([1 << 20, 3]);
        const content = readFileSync(f);
        for (let i = 0; i < count; i++) {
          if (content[2 * i + 1] !== data[i] || content[2 * i] !== 0) expect.fail(`byte ${i}: ${content[2 * i + 1]} at ${2 * i + 1}, want ${data[i]}`);
        }
        const got = await v.readPieces(pieces, Buffer.alloc(count));
        expect(calls).to.deep.equal([1 << 20, 3, 1 << 20, 3]);
        expect(got.equals(data)).to.equal(true);
      } finally {
        await v.close();
      }
    });

    it('close() waits for a writePieces job in flight (real addon): the data is in the file afterwards', async () => {
      const size = 96 * MiB;
      const f = file();
      const v = await SparseFileVolume.open(f, { create: { size } });
      const pieces = scatter(1000, size, 13);
      const data = randomBytes(totalLength(pieces));
      expect(data.length).to.be.above(16 * MiB);
      let wrote = false;
      const writing = v.writePieces(pieces, data).then(() => (wrote = true));
      await v.close();
      expect(wrote, 'writePieces settled before close() did').to.equal(true);
      await writing;
      const content = readFileSync(f);
      let at = 0;
      for (const p of pieces) {
        if (!content.subarray(p.offset, p.offset + p.length).equals(data.subarray(at, at + p.length))) expect.fail(`piece at ${p.offset}+${p.length} not in the file`);
        at += p.length;
      }
    });

    it('close() waits for a native job held back by a test double, and no job starts once close() has begun', async () => {
      let release!: () => void;
      const held = new Promise<void>((r) => (release = r));
      let started = 0;
      const real = native();
      const ops: NativeOps = {
        ...real,
        pwritePieces: async (fd, pos, len, data) => {
          started++;
          await held;
          return real.pwritePieces(fd, pos, len, data);
        },
      };
      const f = file();
      const v = await SparseFileVolume.open(f, { create: { size: 1 * MiB }, ops });
      const writing = v.writePieces([{ offset: 0, length: 3 }, { offset: 8192, length: 3 }], Buffer.from('abcdef'));
      let closed = false;
      const closing = v.close().then(() => (closed = true));
      for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
      expect(closed, 'close() resolved while a native job was in flight').to.equal(false);
      expect((await rejection(v.writePieces([{ offset: 0, length: 1 }, { offset: 9, length: 1 }], Buffer.alloc(2)))).code).to.equal('TM_ERR_VOLUME_IO');
      release();
      await writing;
      await closing;
      expect(started).to.equal(1);
      const content = readFileSync(f);
      expect(content.subarray(0, 3).toString() + content.subarray(8192, 8195).toString()).to.equal('abcdef');
    });
  });
});
