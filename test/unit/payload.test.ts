import { expect } from 'chai';
import fc from 'fast-check';
import { compressSync, uncompressSync } from 'lz4-napi';
import { randomBytes } from 'node:crypto';
import { TmError } from '../../src/errors.js';
import { native } from '../../src/native/index.js';
import { decode, encode } from '../../src/wire/codec.js';
import type { DecodeContext, ExtentMsg } from '../../src/wire/messages.js';
import { compressPayload, crc32c, decompressPayload, makeDataExtent } from '../../src/wire/payload.js';

const CS = 65536;
/** Ten full chunks and a tail of 1000 bytes. */
const ctx: DecodeContext = { volumeSize: 10 * CS + 1000, chunkSize: CS };
const text = Buffer.from('thin stays thin on the replica. '.repeat(2048)); // 64 KiB, compressible
const tail = randomBytes(1000);

describe('payload: lz4 when it saves space, CRC-32C of the uncompressed bytes (native addon)', () => {
  it('CRC-32C gives the check value and the RFC 3720 (iSCSI) test vectors, with SSE4.2 and with tables alike', () => {
    const inc = Buffer.from(Array.from({ length: 32 }, (_, i) => i));
    const vectors: [Buffer, number][] = [
      [Buffer.from('123456789'), 0xe3069283],
      [Buffer.alloc(32), 0x8a9136aa],
      [Buffer.alloc(32, 0xff), 0x62a8ab43],
      [inc, 0x46dd794e],
      [Buffer.from(inc).reverse(), 0x113fdb5c],
      [Buffer.alloc(0), 0],
    ];
    for (const [buf, want] of vectors) {
      expect(crc32c(buf), buf.toString('hex')).to.equal(want);
      expect(native().crc32cPortable(buf), buf.toString('hex')).to.equal(want);
    }
  });

  it('CRC-32C: the SSE4.2 path and the table path agree at every length and alignment', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 3000 }), fc.nat(15), (bytes, skip) => {
        const view = Buffer.from(bytes).subarray(Math.min(skip, bytes.length));
        expect(crc32c(view)).to.equal(native().crc32cPortable(view));
      }),
      { numRuns: 500 },
    );
    // Around the three-stream blocks (3 x 256 and 3 x 8192 bytes) and well past them.
    const big = randomBytes(1024 * 1024 + 64);
    for (const len of [767, 768, 769, 3 * 256 * 2 + 5, 24575, 24576, 24577, 2 * 24576 + 800, 65536, 1024 * 1024 + 3]) {
      for (const skip of [0, 1, 5, 8]) {
        const view = big.subarray(skip, skip + len);
        expect(crc32c(view), `${len} bytes from ${skip}`).to.equal(native().crc32cPortable(view));
      }
    }
    expect(() => crc32c('abc' as unknown as Buffer)).to.throw(TypeError);
  });

  it('compressPayload writes the lz4_flex "size prepended" form lz4-napi reads, into the caller\'s buffer, with the CRC-32C', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 4000 }), fc.integer({ min: 0, max: 50 }), async (seed, reps) => {
        const raw = Buffer.concat([Buffer.from(seed), ...Array.from({ length: reps }, () => Buffer.from(seed.subarray(0, 64)))]);
        const into = Buffer.alloc(raw.length + 16, 0xee);
        const p = await compressPayload(raw, into);
        expect(p.crc32c).to.equal(native().crc32cPortable(raw));
        if (p.codec === 'lz4') {
          expect(p.payload.buffer).to.equal(into.buffer);
          expect(p.payload.byteOffset).to.equal(into.byteOffset);
          expect(p.payload.length).to.be.lessThan(raw.length);
          expect(uncompressSync(p.payload).equals(raw)).to.equal(true);
          expect(into.subarray(raw.length).every((b) => b === 0xee)).to.equal(true);
        } else {
          expect(p.payload).to.equal(raw); // the same buffer, not a copy
        }
      }),
      { numRuns: 300 },
    );
  });

  it('lz4CompressCrc refuses a destination that overlaps the source', async () => {
    const b = Buffer.alloc(2 * CS);
    expect(() => native().lz4CompressCrc(b.subarray(0, CS + 10), b.subarray(CS))).to.throw(RangeError, /overlap/);
    const [n, crc] = await native().lz4CompressCrc(b.subarray(0, CS), b.subarray(CS));
    expect(n).to.be.greaterThan(4).and.lessThan(CS);
    expect(crc).to.equal(crc32c(b.subarray(0, CS)));
  });

  it('compresses when it helps and keeps random or tiny data raw', async () => {
    const c = await compressPayload(text);
    expect(c.codec).to.equal('lz4');
    expect(c.payload.length).to.be.lessThan(text.length / 4);
    expect(c.payload.readUInt32LE(0)).to.equal(text.length);
    const rnd = randomBytes(CS);
    const r = await compressPayload(rnd);
    expect(r.codec).to.equal('raw');
    expect(r.payload).to.equal(rnd); // the same buffer, not a copy
    expect((await compressPayload(Buffer.from('abc'))).codec).to.equal('raw');
  });

  it('makeDataExtent builds an extent that travels and decompresses to the same bytes', async () => {
    const ext = await makeDataExtent(7, CS, text);
    expect(ext).to.include({ type: 'extent', seq: 7, kind: 'data', offset: CS, length: text.length, codec: 'lz4', crc32c: crc32c(text) });
    const back = decode(encode(ext), ctx) as ExtentMsg;
    expect(decompressPayload(back).equals(text)).to.equal(true);
    const r = await makeDataExtent(1, 0, tail);
    expect(r.codec).to.equal('raw');
  });

  it('decompresses lz4 into the caller\'s scratch buffer when it is large enough, else into a new one', async () => {
    const ext = decode(encode(await makeDataExtent(1, 0, text)), ctx) as ExtentMsg;
    expect(ext.codec).to.equal('lz4');
    const scratch = Buffer.alloc(text.length + 100, 0xee);
    const raw = decompressPayload(ext, scratch);
    expect(raw.buffer).to.equal(scratch.buffer);
    expect(raw.byteOffset).to.equal(scratch.byteOffset);
    expect(raw.equals(text)).to.equal(true);
    expect(scratch[text.length]).to.equal(0xee);
    const small = Buffer.alloc(10);
    const other = decompressPayload(ext, small);
    expect(other.buffer).to.not.equal(small.buffer);
    expect(other.equals(text)).to.equal(true);
    // A failing payload leaves nothing usable but never throws anything else.
    expect(() => decompressPayload({ ...ext, crc32c: (ext.crc32c! + 1) >>> 0 }, scratch)).to.throw(TmError).with.property('code', 'TM_ERR_CHECKSUM');
  });

  it('the native lz4 decoder (upstream LZ4_decompress_safe) reads what lz4-napi writes and refuses blocks that do not fit', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 1, maxLength: 5000 }), fc.integer({ min: 1, max: 64 }), fc.integer({ min: 0, max: 255 }), (seed, reps, fill) => {
        // Repetitive input (matches, overlapping matches) with some noise.
        const raw = Buffer.concat([Buffer.from(seed), Buffer.alloc(reps * 7, fill), ...Array.from({ length: reps }, () => Buffer.from(seed.subarray(0, 37)))]);
        const c = compressSync(raw);
        // dst is a view of exactly the length: nothing after it is touched.
        const big = Buffer.alloc(raw.length + 8, 0xee);
        expect(native().lz4DecompressInto(c.subarray(4), big.subarray(0, raw.length))).to.equal(raw.length);
        expect(big.subarray(0, raw.length).equals(raw)).to.equal(true);
        expect(big.subarray(raw.length).every((b) => b === 0xee)).to.equal(true);
        // A larger dst: the same bytes (what follows them may be written over).
        const out = Buffer.alloc(raw.length + 64);
        expect(native().lz4DecompressInto(c.subarray(4), out)).to.equal(raw.length);
        expect(out.subarray(0, raw.length).equals(raw)).to.equal(true);
        expect(native().lz4DecompressInto(c.subarray(4), Buffer.alloc(raw.length - 1))).to.equal(-1);
        const cut = native().lz4DecompressInto(c.subarray(4, c.length - 1), Buffer.alloc(raw.length));
        expect(cut).to.be.at.most(raw.length);
      }),
      { numRuns: 500 },
    );
  });

  it('a payload that does not match its CRC-32C is TM_ERR_CHECKSUM naming offset and length', async () => {
    const ext = await makeDataExtent(1, 3 * CS, text);
    expect(() => decompressPayload({ ...ext, crc32c: (ext.crc32c! + 1) >>> 0 }))
      .to.throw(TmError, 'offset 196608, length 65536')
      .with.property('code', 'TM_ERR_CHECKSUM');
    const bytes = Buffer.from('abcd');
    const rawExt: ExtentMsg = { type: 'extent', seq: 1, kind: 'data', offset: 0, length: 4, codec: 'raw', crc32c: crc32c(bytes), payload: Buffer.from('abce') };
    expect(() => decompressPayload(rawExt)).to.throw(TmError).with.property('code', 'TM_ERR_CHECKSUM');
  });

  it('lz4 garbage is TM_ERR_PROTOCOL; a wrong extent kind is a bug', () => {
    const garbage = Buffer.concat([Buffer.from([0, 0, 1, 0]), Buffer.alloc(100, 0xff)]);
    const ext: ExtentMsg = { type: 'extent', seq: 1, kind: 'data', offset: 0, length: CS, codec: 'lz4', crc32c: 0, payload: garbage };
    expect(() => decompressPayload(ext)).to.throw(TmError).with.property('code', 'TM_ERR_PROTOCOL');
    expect(() => decompressPayload({ ...ext, payload: Buffer.from([0xff, 0xff, 0xff, 0xff, 0]) })).to.throw(TmError).with.property('code', 'TM_ERR_PROTOCOL');
    expect(() => decompressPayload({ type: 'extent', seq: 1, kind: 'zero', offset: 0, length: CS })).to.throw(TmError).with.property('code', 'TM_ERR_INTERNAL');
  });

  it('(e) a corrupted lz4 payload decompresses to the right bytes or fails with a code, never crashes', () => {
    const ext: ExtentMsg = { type: 'extent', seq: 3, kind: 'data', offset: 0, length: CS, codec: 'lz4', crc32c: crc32c(text), payload: compressSync(text) };
    fc.assert(
      fc.property(fc.integer({ min: 4, max: ext.payload!.length - 1 }), fc.integer({ min: 1, max: 255 }), (at, x) => {
        const payload = Buffer.from(ext.payload!);
        payload[at]! ^= x;
        try {
          expect(decompressPayload({ ...ext, payload }).equals(text)).to.equal(true);
        } catch (e) {
          if (!(e instanceof TmError) || !['TM_ERR_CHECKSUM', 'TM_ERR_PROTOCOL'].includes(e.code)) throw e;
        }
      }),
      { numRuns: 1000 },
    );
  });
});
