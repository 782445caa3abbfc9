import { expect } from 'chai';
import { ErrorCodes, TmError } from '../../src/errors.js';
import { prng, textLike } from '../../src/util/sample.js';
import { sameContent } from '../../src/volume/memory.js';
import { native } from '../../src/native/index.js';
import { FrameMac, frameTag, proofPrimary, proofSecondary, sessionKey, TAG_BYTES } from '../../src/wire/auth.js';
import { decode, encode } from '../../src/wire/codec.js';
import { primaryHandshake, secondaryHandshake } from '../../src/wire/handshake.js';
import { memorySessionPair, type FrameAction } from '../../src/wire/memory.js';
import { MAX_HANDSHAKE_FRAME_BYTES, type DecodeContext, type ExtentMsg, type Message } from '../../src/wire/messages.js';
import { crc32c, decompressPayload, makeDataExtent } from '../../src/wire/payload.js';
import type { Session } from '../../src/wire/session.js';
import { MemoryMirrorPair } from '../helpers/mirror-pair.js';
import { rejection } from '../helpers/rejection.js';

const KEY = Buffer.from('frame-auth-test-pre-shared-key-0123456789');
const KiB = 1024;
const MiB = 1024 * KiB;
const VOLUME: DecodeContext = { volumeSize: 4 * MiB, chunkSize: 4096 };
const commit = (generation: number): Message => ({ type: 'commit', generation });
/** The attacker's bytes: no chunk of the sources below holds a run of them. */
const EVIL = 0xee;

type OnFrame = (from: 'a' | 'b', index: number, frame: Buffer) => FrameAction;

/**
 * A memory pair through the real handshake: `a` runs the primary's half, `b`
 * the secondary's and answers ready. Frames from a: 0 hello, 1 auth, then
 * protected (MAC seq = index - 2); from b: 0 challenge, then protected (ready is
 * seq 0).
 */
async function handshaken(onFrame?: OnFrame): Promise<{ a: Session; b: Session }> {
  const { a, b } = memorySessionPair({ names: ['secondary test', 'primary test'], ...(onFrame ? { onFrame } : {}) });
  const sec = secondaryHandshake(b, { node: 'site-b', psk: KEY }).then(({ auth }) => {
    b.ctx.volumeSize = auth.volumeSize;
    b.ctx.chunkSize = auth.chunkSize;
    b.send({ type: 'ready', committedGeneration: 0, applying: null });
  });
  await primaryHandshake(a, { node: 'site-a', mirror: 'vm1', psk: KEY, volumeSize: VOLUME.volumeSize!, chunkSize: VOLUME.chunkSize!, volumeId: 'ab12' });
  await sec;
  return { a, b };
}

/**
 * What a relay without the key does to a data extent: its payload replaced by
 * EVIL bytes of the same length, sent raw with their correct CRC-32C, the rest
 * of the frame (and the MAC tag, when `tagBytes`) as it was. Null for a frame
 * that is not a data extent.
 */
function forgeExtent(frame: Buffer, tagBytes: number): Buffer | null {
  if (frame.length <= tagBytes) return null;
  let msg: Message;
  try {
    msg = decode(frame.subarray(0, frame.length - tagBytes), VOLUME);
  } catch {
    return null; // a handshake frame (no tag) or not ours to decode
  }
  if (msg.type !== 'extent' || msg.kind !== 'data') return null;
  const payload = Buffer.alloc(msg.length, EVIL);
  const evil: ExtentMsg = { ...msg, codec: 'raw', payload, crc32c: crc32c(payload) };
  return Buffer.concat([encode(evil), frame.subarray(frame.length - tagBytes)]);
}

function hasEvilRun(buf: Buffer): boolean {
  return buf.includes(Buffer.alloc(64, EVIL));
}

describe('frame integrity after the handshake (issue 14 §2)', () => {
  it('keys and tags: HKDF over both nonces and the mirror; the tag covers direction, sequence number and bytes', () => {
    const nP = Buffer.alloc(32, 1);
    const nS = Buffer.alloc(32, 2);
    const k = sessionKey(KEY, 'vm1', nP, nS);
    expect(k).to.have.length(32);
    expect(sessionKey(KEY, 'vm1', nP, nS).equals(k)).to.equal(true);
    for (const other of [sessionKey(KEY, 'vm2', nP, nS), sessionKey(KEY, 'vm1', nS, nP), sessionKey(Buffer.from('another key'), 'vm1', nP, nS)]) {
      expect(other.equals(k)).to.equal(false);
    }
    const f = encode(commit(1));
    const t = frameTag(k, 'primary', 0, f);
    expect(t).to.have.length(TAG_BYTES);
    expect(frameTag(k, 'secondary', 0, f).equals(t), 'direction').to.equal(false);
    expect(frameTag(k, 'primary', 1, f).equals(t), 'sequence number').to.equal(false);
    expect(frameTag(k, 'primary', 0, encode(commit(2))).equals(t), 'bytes').to.equal(false);
    // The addon's GMAC (what sessions use) gives exactly the tags of Node's AES-256-GCM.
    const mac = new FrameMac(k);
    const rnd = prng(7);
    for (const [from, seq, size] of [['primary', 0, 0], ['secondary', 1, 1], ['primary', 2 ** 32 + 5, 4 * KiB], ['secondary', Number.MAX_SAFE_INTEGER, MiB + 3]] as const) {
      const frame = Buffer.alloc(size);
      for (let i = 0; i < size; i++) frame[i] = Math.floor(rnd() * 256);
      const want = frameTag(k, from, seq, frame);
      expect(mac.tag(from, seq, frame).equals(want), `${from} ${seq} ${size}`).to.equal(true);
      // A frame sent in two parts (head, payload) has the tag of their concatenation, wherever it is cut.
      for (const cut of [0, Math.floor(size / 3), size]) {
        expect(mac.tag(from, seq, frame.subarray(0, cut), frame.subarray(cut)).equals(want), `${from} ${seq} ${size} cut at ${cut}`).to.equal(true);
      }
      expect(mac.verify(from, seq, frame, want)).to.equal(true);
      const bad = Buffer.from(want);
      bad[15] = bad[15]! ^ 1;
      expect(mac.verify(from, seq, frame, bad), 'a flipped tag bit').to.equal(false);
      expect(mac.verify(from, seq, frame, want.subarray(0, 15)), 'a short tag').to.equal(false);
    }
    expect(() => new FrameMac(Buffer.alloc(31))).to.throw(TypeError, /32 bytes/);
    // NIST's GCM test case 13 (AES-256, zero key and nonce, nothing authenticated): the addon's AES-256-GCM itself.
    expect(native().gmacTag(native().gmacKey(Buffer.alloc(32)), 0, 0, Buffer.alloc(0)).toString('hex')).to.equal('530f8afbc74536b9a963b4f1c4cb738b');
    // The proofs cover the names and, for the primary, the volume identity.
    const tr = { mirror: 'vm1', primaryNode: 'site-a', secondaryNode: 'site-b', nonceP: nP, nonceS: nS };
    expect(proofSecondary(KEY, tr).equals(proofSecondary(KEY, { ...tr, primaryNode: 'site-x' }))).to.equal(false);
    const vol = { volumeSize: 1 << 20, chunkSize: 4096, volumeId: 'ab' };
    const pp = proofPrimary(KEY, tr, vol);
    for (const other of [{ ...vol, volumeSize: 2 << 20 }, { ...vol, chunkSize: 8192 }, { ...vol, volumeId: 'ac' }, { ...vol, fresh: true }]) {
      expect(proofPrimary(KEY, tr, other).equals(pp), JSON.stringify(other)).to.equal(false);
    }
  });

  it('after the handshake every frame carries a 32-byte tag, both ways, and messages pass', async () => {
    const sizes: { from: string; index: number; bytes: number }[] = [];
    const { a, b } = await handshaken((from, index, frame) => (sizes.push({ from, index, bytes: frame.length }), 'pass'));
    expect(a.authenticated && b.authenticated).to.equal(true);
    a.send(commit(7));
    b.send(commit(8));
    expect(await a.next(2000)).to.deep.equal(commit(8));
    expect(await b.next(2000)).to.deep.equal(commit(7));
    const plain = encode(commit(7)).length;
    expect(sizes.find((s) => s.from === 'a' && s.index === 2)?.bytes).to.equal(plain + TAG_BYTES);
    expect(sizes.find((s) => s.from === 'b' && s.index === 2)?.bytes).to.equal(plain + TAG_BYTES);
    a.close();
    b.close();
  });

  it('a data extent rewritten with a correct CRC-32C ends the session with TM_ERR_FRAME_AUTH; nothing of it is handed out', async () => {
    const { a, b } = await handshaken((from, index, frame) => {
      const forged = from === 'a' && index === 3 ? forgeExtent(frame, TAG_BYTES) : null;
      return forged ? { replace: forged } : 'pass';
    });
    const rnd = prng(3);
    a.send(commit(1)); // index 2
    a.send(await makeDataExtent(1, 0, textLike(64 * KiB, rnd))); // index 3: forged on the way
    a.send(commit(2));
    expect(await b.next(2000)).to.deep.equal(commit(1));
    const err = await rejection(b.next(2000));
    expect(err.code).to.equal(ErrorCodes.FRAME_AUTH);
    expect(err.message).to.contain('frame 1 from primary test');
    expect((await b.closed)?.code).to.equal(ErrorCodes.FRAME_AUTH);
    // b's error frame carries its own MAC: a verifies it and ends with the same code.
    expect((await a.closed)?.code).to.equal(ErrorCodes.FRAME_AUTH);
  });

  it('negative control: without the MAC (no handshake) the same forgery is delivered and passes its CRC-32C', async () => {
    const { a, b } = memorySessionPair({ onFrame: (from, _i, frame) => (from === 'a' ? { replace: forgeExtent(frame, 0) ?? frame } : 'pass') });
    b.ctx.volumeSize = VOLUME.volumeSize;
    b.ctx.chunkSize = VOLUME.chunkSize;
    a.send(await makeDataExtent(1, 0, textLike(64 * KiB, prng(3))));
    const m = await b.next(2000);
    if (m.type !== 'extent') expect.fail(`expected an extent, got ${m.type}`);
    expect(hasEvilRun(decompressPayload(m))).to.equal(true);
    a.close();
  });

  // Each relay acts on the primary's frames; index 2 is the first protected one.
  const relays: { name: string; action: (index: number, frame: Buffer, kept: Buffer[]) => FrameAction; delivered: number[] }[] = [
    { name: 'a byte flipped', action: (i, f) => (i === 3 ? { replace: Buffer.from(f).fill(f[0]! ^ 1, 0, 1) } : 'pass'), delivered: [1] },
    { name: 'a frame dropped', action: (i) => (i === 3 ? 'drop' : 'pass'), delivered: [1] },
    { name: 'a frame replayed', action: (i, f) => (i === 3 ? { replace: [f, f] } : 'pass'), delivered: [1, 2] },
    { name: 'an old frame replayed in place of a new one', action: (i, f, kept) => (i === 2 ? (kept.push(Buffer.from(f)), 'pass') : i === 4 ? { replace: kept[0]! } : 'pass'), delivered: [1, 2] },
    { name: 'two frames swapped', action: (i, f, kept) => (i === 3 ? (kept.push(Buffer.from(f)), 'drop') : i === 4 ? { replace: [f, kept[0]!] } : 'pass'), delivered: [1] },
    { name: 'a frame injected (a valid commit without a tag)', action: (i, f) => (i === 3 ? { replace: [encode(commit(99)), f] } : 'pass'), delivered: [1] },
    { name: 'the tag cut off', action: (i, f) => (i === 3 ? { replace: f.subarray(0, f.length - TAG_BYTES) } : 'pass'), delivered: [1] },
  ];
  for (const r of relays) {
    it(`${r.name}: TM_ERR_FRAME_AUTH, and nothing from that frame on is handed out`, async () => {
      const kept: Buffer[] = [];
      const { a, b } = await handshaken((from, index, frame) => (from === 'a' ? r.action(index, frame, kept) : 'pass'));
      for (let g = 1; g <= 4; g++) a.send(commit(g)); // indexes 2..5
      const got: number[] = [];
      let err: TmError | null = null;
      for (;;) {
        try {
          const m = await b.next(2000);
          if (m.type !== 'commit') expect.fail(`expected a commit, got ${m.type}`);
          got.push(m.generation);
        } catch (e) {
          err = e as TmError;
          break;
        }
      }
      expect(got).to.deep.equal(r.delivered);
      expect(err?.code).to.equal(ErrorCodes.FRAME_AUTH);
      expect((await a.closed)?.code).to.equal(ErrorCodes.FRAME_AUTH);
    });
  }

  it("a frame reflected back to its sender, under the right sequence number: TM_ERR_FRAME_AUTH (the direction is in the tag)", async () => {
    let kept: Buffer | null = null;
    const { a, b } = await handshaken((from, index, frame) => {
      if (from === 'a' && index === 3) kept = Buffer.from(frame); // the primary's frame seq 1
      // The secondary's frame seq 1 (ready was seq 0) is replaced by it.
      if (from === 'b' && index === 2) return { replace: kept! };
      return 'pass';
    });
    a.send(commit(1));
    a.send(commit(2));
    expect((await b.next(2000)).type).to.equal('commit');
    expect((await b.next(2000)).type).to.equal('commit');
    b.send(commit(2));
    const err = await rejection(a.next(2000));
    expect(err.code).to.equal(ErrorCodes.FRAME_AUTH);
    expect(err.message).to.contain('frame 1 from secondary test');
  });

  it('a frame slipped in right behind the auth frame is held until the key is known, then refused (never decoded as plain)', async () => {
    const { a, b } = memorySessionPair({
      names: ['secondary test', 'primary test'],
      // After the auth frame (index 1) a forged ready-like commit travels without a tag.
      onFrame: (from, index, frame) => (from === 'a' && index === 1 ? { replace: [frame, encode(commit(42))] } : 'pass'),
    });
    const sec = secondaryHandshake(b, { node: 'site-b', psk: KEY });
    const pri = primaryHandshake(a, { node: 'site-a', mirror: 'vm1', psk: KEY, volumeSize: VOLUME.volumeSize!, chunkSize: VOLUME.chunkSize!, volumeId: 'ab12' }).catch((e: TmError) => e);
    await sec; // the handshake itself succeeds: the slipped frame was held, undecoded
    const err = await rejection(b.next(2000));
    expect(err.code).to.equal(ErrorCodes.FRAME_AUTH);
    expect(((await pri) as TmError).code).to.equal(ErrorCodes.FRAME_AUTH);
  });

  it("a forged ready in place of the secondary's (no tag): the primary ends with TM_ERR_FRAME_AUTH", async () => {
    const { a, b } = memorySessionPair({
      names: ['secondary test', 'primary test'],
      onFrame: (from, index) => (from === 'b' && index === 1 ? { replace: encode({ type: 'ready', committedGeneration: 1000, applying: null }) } : 'pass'),
    });
    const sec = secondaryHandshake(b, { node: 'site-b', psk: KEY }).then(() => b.send({ type: 'ready', committedGeneration: 0, applying: null }));
    const err = await rejection(primaryHandshake(a, { node: 'site-a', mirror: 'vm1', psk: KEY, volumeSize: VOLUME.volumeSize!, chunkSize: VOLUME.chunkSize!, volumeId: 'ab12' }));
    expect(err.code).to.equal(ErrorCodes.FRAME_AUTH);
    await sec;
    expect((await b.closed)?.code).to.equal(ErrorCodes.FRAME_AUTH);
  });

  it("the auth frame's volume identity changed on the way: the secondary refuses with TM_ERR_AUTH_FAILED before using it", async () => {
    const { a, b } = memorySessionPair({
      names: ['secondary test', 'primary test'],
      onFrame: (from, index, frame) => {
        if (from !== 'a' || index !== 1) return 'pass';
        const auth = decode(frame, {});
        if (auth.type !== 'auth') expect.fail(`expected auth, got ${auth.type}`);
        return { replace: encode({ ...auth, volumeSize: auth.volumeSize * 2, fresh: true }) };
      },
    });
    const secP = rejection(secondaryHandshake(b, { node: 'site-b', psk: KEY }));
    const pri = await rejection(primaryHandshake(a, { node: 'site-a', mirror: 'vm1', psk: KEY, volumeSize: VOLUME.volumeSize!, chunkSize: VOLUME.chunkSize!, volumeId: 'ab12' }));
    const sec = await secP;
    expect(sec.code).to.equal(ErrorCodes.AUTH_FAILED);
    // The refusal travels without a MAC (the secondary never accepted the key): to the primary it is a frame that fails its check.
    expect([ErrorCodes.AUTH_FAILED, ErrorCodes.FRAME_AUTH]).to.include(pri.code);
  });

  it('before authentication a frame larger than the handshake needs is refused without being decoded (TM_ERR_PREAUTH_LIMIT)', async () => {
    const { a, b } = memorySessionPair({ names: ['secondary test', 'primary test'] });
    const sec = rejection(secondaryHandshake(b, { node: 'site-b', psk: KEY }));
    // Millions of empty maps: msgpack array32 of 0x80 (fixmap 0). Decoding it takes seconds and hundreds of MiB.
    const bomb = Buffer.alloc(8 * MiB, 0x80);
    bomb[0] = 0xdd;
    bomb.writeUInt32BE(bomb.length - 5, 1);
    a.channel.send([bomb]);
    const t0 = performance.now();
    const err = await sec;
    expect(err.code).to.equal(ErrorCodes.PREAUTH_LIMIT);
    expect(err.message).to.contain(`a frame of ${bomb.length} bytes, more than the ${MAX_HANDSHAKE_FRAME_BYTES} bytes`);
    expect(performance.now() - t0).to.be.lessThan(5000); // not a timing target: decoding would have failed with TM_ERR_PROTOCOL anyway
    expect((await a.closed)?.code).to.equal(ErrorCodes.PREAUTH_LIMIT);
  });
});

describe('frame integrity: a relay rewriting data extents between two mirrors (issue 14 §2)', function () {
  this.timeout(60_000);
  let pair: MemoryMirrorPair;
  afterEach(async () => {
    await pair?.cleanup();
  });

  it('every session ends with TM_ERR_FRAME_AUTH and the replica never holds the attacker\'s bytes; without the relay it converges', async () => {
    pair = await MemoryMirrorPair.create(1 * MiB);
    const rnd = prng(11);
    await pair.source.write(0, textLike(1 * MiB, rnd));
    let forged = 0;
    let attacking = true;
    pair.onFrame = (_index, from, frame) => {
      if (!attacking || from !== 'a') return 'pass';
      const f = forgeExtent(frame, TAG_BYTES);
      if (!f) return 'pass';
      forged++;
      return { replace: f };
    };
    await pair.startSecondary();
    await pair.startPrimary();
    const sec = await pair.waitFor(() => pair.secondary, (s) => s.error?.code === ErrorCodes.FRAME_AUTH && forged >= 3, 'three forged extents refused');
    expect(sec.error!.message).to.contain('failed its integrity check');
    const pri = await pair.waitPrimary((s) => s.error?.code === ErrorCodes.FRAME_AUTH, 'the primary told of the refusal');
    expect(pri.committedGeneration).to.equal(0);
    expect((await pair.secondary!.status()).appliedBytes, 'no data payload applied').to.equal(0);
    expect(hasEvilRun(await pair.target.read(0, 1 * MiB)), "the attacker's bytes in the replica").to.equal(false);
    attacking = false;
    await pair.waitCommitted(1);
    expect(await sameContent(pair.source, pair.target)).to.equal(true);
  });
});
