import { expect } from 'chai';
import fc from 'fast-check';
import { Packr } from 'msgpackr';
import { randomBytes } from 'node:crypto';
import { TmError } from '../../src/errors.js';
import { compressPayload, crc32, decode, decompressPayload, encode, makeDataExtent } from '../../src/wire/codec.js';
import type { DecodeContext, ExtentMsg, Message } from '../../src/wire/messages.js';

const raw = new Packr({ useRecords: false });
const ctx: DecodeContext = { volumeSize: 10 * 65536 + 1000, chunkSize: 65536 };
const nonce = Buffer.alloc(32, 7);

/** Decode a hand-built object and expect a TM_ERR_PROTOCOL naming `field`. */
function refused(obj: unknown, field: string, c: DecodeContext = ctx): void {
  try {
    decode(raw.pack(obj), c);
  } catch (e) {
    expect(e).to.be.instanceOf(TmError);
    expect((e as TmError).code).to.equal('TM_ERR_PROTOCOL');
    expect((e as TmError).message).to.contain(field);
    return;
  }
  expect.fail(`decode accepted ${JSON.stringify(obj)}`);
}

const samples: Message[] = [
  { type: 'hello', version: 1, node: 'site-a', mirror: 'db1', nonce },
  { type: 'challenge', version: 1, node: 'site-b', nonce, proof: Buffer.alloc(32, 9) },
  { type: 'auth', proof: Buffer.alloc(32, 1), volumeSize: 123456789, chunkSize: 65536, volumeId: 'deadbeef' },
  { type: 'ready', committedGeneration: 3, applying: { generation: 4, cursor: 65536 } },
  { type: 'ready', committedGeneration: 0, applying: null },
  { type: 'begin', generation: 4, resumeFrom: 131072 },
  { type: 'extent', seq: 1, kind: 'zero', offset: 0, length: 65536 },
  { type: 'extent', seq: 2, kind: 'trim', offset: 65536, length: 9 * 65536 + 1000 },
  { type: 'extent', seq: 3, kind: 'data', offset: 0, length: 4, codec: 'raw', crc32: crc32(Buffer.from('abcd')), payload: Buffer.from('abcd') },
  { type: 'commit', generation: 4 },
  { type: 'ack', seq: 17, durable: 65536 },
  { type: 'committed', generation: 4 },
  { type: 'error', code: 'TM_ERR_AUTH_FAILED', message: 'keys differ' },
];

describe('codec: msgpack frames, validated before anything acts on them', () => {
  it('round-trips every message type', () => {
    for (const m of samples) {
      const c = m.type === 'extent' && m.kind === 'data' ? { volumeSize: 4, chunkSize: 65536 } : ctx;
      expect(decode(encode(m), c), m.type).to.deep.equal(m);
    }
  });

  it('refuses unknown types, missing and unknown fields', () => {
    refused({ type: 'nope' }, 'unknown frame type');
    refused({ version: 1 }, 'type');
    refused([1, 2, 3], 'map');
    refused({ type: 'commit' }, 'commit.generation');
    refused({ type: 'commit', generation: 1, extra: true }, 'extra');
  });

  it('refuses bad integers: negative, fractional, unsafe, strings, bigints', () => {
    refused({ type: 'commit', generation: -1 }, 'commit.generation');
    refused({ type: 'commit', generation: 0 }, 'commit.generation');
    refused({ type: 'commit', generation: 1.5 }, 'commit.generation');
    refused({ type: 'commit', generation: '1' }, 'commit.generation');
    refused({ type: 'commit', generation: 2 ** 60 }, 'commit.generation');
    refused({ type: 'ack', seq: 1, durable: -5 }, 'ack.durable');
  });

  it('refuses bad names, nonces, proofs, chunk sizes, volume ids, error codes', () => {
    refused({ type: 'hello', version: 1, node: 'a b', mirror: 'db1', nonce }, 'hello.node');
    refused({ type: 'hello', version: 1, node: 'a', mirror: 'x'.repeat(129), nonce }, 'hello.mirror');
    refused({ type: 'hello', version: 1, node: 'a', mirror: '../etc', nonce }, 'hello.mirror');
    refused({ type: 'hello', version: 1, node: 'a', mirror: 'db1', nonce: Buffer.alloc(31) }, 'hello.nonce');
    refused({ type: 'hello', version: 0, node: 'a', mirror: 'db1', nonce }, 'hello.version');
    refused({ type: 'challenge', version: 1, node: 'b', nonce, proof: 'xx' }, 'challenge.proof');
    refused({ type: 'auth', proof: nonce, volumeSize: 10, chunkSize: 3000, volumeId: 'ab' }, 'auth.chunkSize');
    refused({ type: 'auth', proof: nonce, volumeSize: 10, chunkSize: 8 << 20, volumeId: 'ab' }, 'auth.chunkSize');
    refused({ type: 'auth', proof: nonce, volumeSize: 10, chunkSize: 65536, volumeId: 'XYZ' }, 'auth.volumeId');
    refused({ type: 'error', code: 'EPERM', message: 'x' }, 'error.code');
    refused({ type: 'error', code: 'TM_ERR_X', message: 'x'.repeat(2000) }, 'error.message');
    refused({ type: 'ready', committedGeneration: 0, applying: { generation: 1 } }, 'ready.applying.cursor');
  });

  it('checks extents against the volume: alignment, bounds, the tail rule', () => {
    const base = { type: 'extent', seq: 1, kind: 'zero' };
    refused({ ...base, offset: 4096, length: 65536 }, 'not a multiple of the chunk size');
    refused({ ...base, offset: 9 * 65536, length: 2 * 65536 }, 'beyond the volume');
    refused({ ...base, offset: 0, length: 1000 }, 'extent.length');
    refused({ ...base, offset: 0, length: 0 }, 'extent.length');
    refused({ ...base, seq: 0, offset: 0, length: 65536 }, 'extent.seq');
    // The tail: a length that is not a multiple of the chunk is fine where it ends the volume.
    expect(decode(raw.pack({ ...base, offset: 10 * 65536, length: 1000 }), ctx)).to.include({ offset: 655360, length: 1000 });
    refused({ ...base, offset: 10 * 65536, length: 999 }, 'extent.length');
    refused({ ...base, offset: 0, length: 65536 }, 'handshake', {});
    refused({ ...base, kind: 'data', offset: 0, length: 65536 }, 'extent');
  });

  it('checks data extent payloads: codec, crc32, raw length, lz4 length, no payload on zero/trim', () => {
    const p = Buffer.alloc(65536, 1);
    const d = { type: 'extent', seq: 1, kind: 'data', offset: 0, length: 65536, codec: 'raw', crc32: crc32(p), payload: p };
    expect(decode(raw.pack(d), ctx)).to.include({ kind: 'data', codec: 'raw' });
    refused({ ...d, codec: 'gzip' }, 'extent.codec');
    refused({ ...d, crc32: -1 }, 'extent.crc32');
    refused({ ...d, crc32: 2 ** 32 }, 'extent.crc32');
    refused({ ...d, payload: p.subarray(0, 100) }, 'extent.payload');
    refused({ ...d, codec: 'lz4', payload: p }, 'lz4');
    refused({ type: 'extent', seq: 1, kind: 'zero', offset: 0, length: 65536, payload: p }, 'payload');
    refused({ ...d, length: 16 * 65536, offset: 0 }, 'extent');
  });

  it('refuses undecodable bytes with TM_ERR_PROTOCOL', () => {
    for (const bytes of [Buffer.alloc(0), Buffer.from([0xc1]), Buffer.from([0xdd, 0xff, 0xff, 0xff, 0xff])]) {
      expect(() => decode(bytes, ctx)).to.throw(TmError).with.property('code', 'TM_ERR_PROTOCOL');
    }
  });

  it('compresses when it helps, keeps random data raw, and checks the CRC-32 on the way in', async () => {
    const text = Buffer.from('thin stays thin on the replica. '.repeat(4096));
    const c = await compressPayload(text);
    expect(c.codec).to.equal('lz4');
    expect(c.payload.length).to.be.lessThan(text.length / 4);
    const r = await compressPayload(randomBytes(65536));
    expect(r.codec).to.equal('raw');
    const ext = await makeDataExtent(1, 0, text.subarray(0, 65536));
    const back = decode(encode(ext), ctx) as ExtentMsg;
    expect(decompressPayload(back).equals(text.subarray(0, 65536))).to.equal(true);
    // A flipped payload byte: caught by the checksum or by lz4, never returned.
    const bad = Buffer.from(ext.payload!);
    bad[bad.length - 1]! ^= 0x40;
    expect(() => decompressPayload({ ...ext, payload: bad })).to.throw(TmError).with.property('code').that.match(/TM_ERR_(CHECKSUM|PROTOCOL)/);
    const rawExt: ExtentMsg = { type: 'extent', seq: 1, kind: 'data', offset: 0, length: 4, codec: 'raw', crc32: crc32(Buffer.from('abcd')), payload: Buffer.from('abce') };
    expect(() => decompressPayload(rawExt)).to.throw(TmError).with.property('code', 'TM_ERR_CHECKSUM');
  });

  describe('fuzzing (fast-check): no input crashes the decoder', () => {
    const onlyCodedErrors = (f: () => unknown) => {
      try {
        f();
      } catch (e) {
        if (!(e instanceof TmError) || !/^TM_ERR_[A-Z_]+$/.test(e.code)) throw e;
      }
    };

    it('arbitrary bytes', () => {
      fc.assert(fc.property(fc.uint8Array({ maxLength: 300 }), (b) => onlyCodedErrors(() => decode(Buffer.from(b), ctx))), { numRuns: 3000 });
    });

    it('arbitrary values and maps with a known type and wrong fields', () => {
      const types = fc.constantFrom('hello', 'challenge', 'auth', 'ready', 'begin', 'extent', 'commit', 'ack', 'committed', 'error');
      const field = fc.oneof(fc.anything({ maxDepth: 1 }), fc.integer(), fc.double(), fc.string(), fc.uint8Array({ maxLength: 40 }), fc.bigInt());
      const obj = fc.record({ type: types, a: field, seq: field, offset: field, length: field, kind: fc.constantFrom('data', 'zero', 'trim', 'x'), generation: field });
      fc.assert(
        fc.property(fc.oneof(fc.anything({ maxDepth: 2, maxKeys: 6 }), obj), (v) => {
          let frame: Buffer;
          try {
            frame = raw.pack(v);
          } catch {
            return; // msgpack cannot carry it (e.g. a bigint beyond 64 bits): no frame to test
          }
          onlyCodedErrors(() => decode(frame, ctx));
        }),
        { numRuns: 2000 },
      );
    });

    it('valid messages round-trip exactly', () => {
      const u = fc.integer({ min: 1, max: 2 ** 40 });
      const msg = fc.oneof(
        fc.record({ type: fc.constant('commit' as const), generation: u }),
        fc.record({ type: fc.constant('committed' as const), generation: u }),
        fc.record({ type: fc.constant('ack' as const), seq: fc.nat(), durable: fc.nat() }),
        fc.record({ type: fc.constant('error' as const), code: fc.constantFrom('TM_ERR_PROTOCOL', 'TM_ERR_AUTH_FAILED'), message: fc.string({ maxLength: 200 }) }),
        fc.record({ type: fc.constant('extent' as const), seq: u, kind: fc.constantFrom('zero' as const, 'trim' as const), offset: fc.integer({ min: 0, max: 9 }).map((c) => c * 65536), length: fc.constant(65536) }),
      );
      fc.assert(
        fc.property(msg, (m) => {
          expect(decode(encode(m as Message), ctx)).to.deep.equal(m);
        }),
        { numRuns: 1000 },
      );
    });

    it('a valid frame with a flipped byte or cut short', () => {
      const frames = samples.map((m) => encode(m));
      fc.assert(
        fc.property(fc.nat(frames.length - 1), fc.nat(), fc.integer({ min: 1, max: 255 }), fc.boolean(), (i, pos, x, cut) => {
          const f = Buffer.from(frames[i]!);
          const at = pos % f.length;
          const mutated = cut ? f.subarray(0, at) : (f[at]! ^= x, f);
          onlyCodedErrors(() => decode(mutated, ctx));
        }),
        { numRuns: 3000 },
      );
    });
  });
});
