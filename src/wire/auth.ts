import { createCipheriv, createHmac, hkdfSync, randomBytes, timingSafeEqual } from 'node:crypto';
import { native, type GmacKeyHandle } from '../native/index.js';
import { NONCE_BYTES } from './messages.js';

/**
 * The keyed parts of protocol v3 (docs/protocol.md): the handshake's mutual
 * proofs of the pre-shared key, the session key derived from it, and the MAC
 * every frame after the handshake carries.
 *
 * proofS = HMAC-SHA256(psk, "thinmirror/3 secondary" 0 mirror 0 nodeP 0 nodeS 0 nonceP nonceS)
 * proofP = HMAC-SHA256(psk, "thinmirror/3 primary"   0 mirror 0 nodeP 0 nodeS 0 nonceP nonceS
 *                           u64be(volumeSize) u32be(chunkSize) volumeId 0 fresh(0|1))
 * Both nonces enter both proofs, so neither side can replay a proof from another
 * session; everything the handshake frames carry (but `version`, which must be
 * equal, and the proofs themselves) enters a proof, so a relay cannot change a
 * name or the volume's identity in transit without the proof failing.
 *
 * key = HKDF-SHA256(ikm psk, salt nonceP || nonceS, info "thinmirror/3 session" 0 mirror), 32 bytes
 * tag = GMAC: the 16-byte tag of AES-256-GCM under key, with the 12-byte nonce
 *       dir || 0 0 0 || u64be(seq), the frame as additional data and nothing
 *       encrypted (NIST SP 800-38D's GMAC)
 * dir is 0x50 ('P') for frames the primary sends, 0x53 ('S') for the secondary's;
 * seq counts the frames one side has sent since the handshake, from 0. Neither
 * is sent: each side counts, so a replayed, reordered, dropped or injected frame
 * is verified under another (dir, seq) and fails, as does a modified one.
 * GMAC needs a nonce never used twice under one key: the key is new in every
 * session (both sides' fresh nonces enter it), and (dir, seq) never repeats in
 * one. It runs on AES-NI and carry-less multiply: about 4x the rate of
 * HMAC-SHA256 here (bench/frame-mac.ts prints both), and its cost per byte is
 * paid on every byte of a sync, on both sides.
 */

/** What both proofs cover: the names and nonces of the hello and the challenge. */
export interface Transcript {
  mirror: string;
  primaryNode: string;
  secondaryNode: string;
  nonceP: Buffer;
  nonceS: Buffer;
}

/** The volume identity of the auth frame, covered by the primary's proof. */
export interface AuthFields {
  volumeSize: number;
  chunkSize: number;
  volumeId: string;
  fresh?: boolean;
}

/** Bytes of a frame tag (GMAC, AES-256-GCM's full tag). */
export const TAG_BYTES = 16;

const ZERO = Buffer.from([0]);

function proofHmac(role: 'primary' | 'secondary', psk: Buffer, t: Transcript) {
  return createHmac('sha256', psk)
    .update(`thinmirror/3 ${role}`)
    .update(ZERO)
    .update(t.mirror, 'utf8')
    .update(ZERO)
    .update(t.primaryNode, 'utf8')
    .update(ZERO)
    .update(t.secondaryNode, 'utf8')
    .update(ZERO)
    .update(t.nonceP)
    .update(t.nonceS);
}

export function proofSecondary(psk: Buffer, t: Transcript): Buffer {
  return proofHmac('secondary', psk, t).digest();
}

export function proofPrimary(psk: Buffer, t: Transcript, a: AuthFields): Buffer {
  const sizes = Buffer.alloc(12);
  sizes.writeBigUInt64BE(BigInt(a.volumeSize), 0);
  sizes.writeUInt32BE(a.chunkSize, 8);
  return proofHmac('primary', psk, t)
    .update(sizes)
    .update(a.volumeId, 'utf8')
    .update(ZERO)
    .update(Buffer.from([a.fresh ? 1 : 0]))
    .digest();
}

/** Constant-time comparison; false for different lengths. */
export function verifyProof(expected: Buffer, got: Buffer): boolean {
  return expected.length === got.length && timingSafeEqual(expected, got);
}

export function newNonce(): Buffer {
  return randomBytes(NONCE_BYTES);
}

/** The session key of one session (see the top of this file). */
export function sessionKey(psk: Buffer, mirror: string, nonceP: Buffer, nonceS: Buffer): Buffer {
  const info = Buffer.concat([Buffer.from('thinmirror/3 session'), ZERO, Buffer.from(mirror, 'utf8')]);
  return Buffer.from(hkdfSync('sha256', psk, Buffer.concat([nonceP, nonceS]), info, 32));
}

/** Which side sent a frame: the first byte of its MAC input. */
export const DIRECTION = { primary: 0x50, secondary: 0x53 } as const;

/**
 * The frame MAC of one session key: the addon's GMAC with the key schedule
 * made once (the same tags as {@link frameTag}, a fraction of its cost per
 * frame: Node's createCipheriv builds a stream and a key schedule per call).
 */
export class FrameMac {
  private readonly handle: GmacKeyHandle;

  constructor(key: Buffer) {
    this.handle = native().gmacKey(key);
  }

  /** The tag of a frame sent in one or two parts (head and data payload): that of their concatenation. */
  tag(from: keyof typeof DIRECTION, seq: number, frame: Buffer, frame2?: Buffer): Buffer {
    return native().gmacTag(this.handle, DIRECTION[from], seq, frame, frame2);
  }

  /** Constant-time check of a received tag; false for a tag of another length. */
  verify(from: keyof typeof DIRECTION, seq: number, frame: Buffer, tag: Buffer): boolean {
    return native().gmacVerify(this.handle, DIRECTION[from], seq, frame, tag);
  }
}

/** The tag of frame number `seq` sent by `from` (see the top of this file), by Node's crypto: the reference {@link FrameMac} is tested against. */
export function frameTag(key: Buffer, from: keyof typeof DIRECTION, seq: number, frame: Buffer): Buffer {
  const nonce = Buffer.alloc(12);
  nonce[0] = DIRECTION[from];
  nonce.writeBigUInt64BE(BigInt(seq), 4);
  const gcm = createCipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_BYTES });
  gcm.setAAD(frame);
  gcm.final();
  return gcm.getAuthTag();
}

/** HMAC-SHA256 over the same input as {@link frameTag}: not used by the protocol; the frame-MAC bench measures it beside GMAC. */
export function frameHmacForBench(key: Buffer, from: keyof typeof DIRECTION, seq: number, frame: Buffer): Buffer {
  const head = Buffer.allocUnsafe(9);
  head[0] = DIRECTION[from];
  head.writeBigUInt64BE(BigInt(seq), 1);
  return createHmac('sha256', key).update(head).update(frame).digest();
}
