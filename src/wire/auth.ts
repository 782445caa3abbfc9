import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { NONCE_BYTES } from './messages.js';

/**
 * Mutual authentication over a pre-shared key (docs/protocol.md):
 * proofS = HMAC-SHA256(psk, "thinmirror/1 secondary" || 0x00 || mirror || 0x00 || nonceP || nonceS)
 * proofP = HMAC-SHA256(psk, "thinmirror/1 primary"   || 0x00 || mirror || 0x00 || nonceP || nonceS)
 * Both nonces enter both proofs, so neither side can replay a proof from another session.
 */
function proof(role: 'primary' | 'secondary', psk: Buffer, mirror: string, nonceP: Buffer, nonceS: Buffer): Buffer {
  return createHmac('sha256', psk)
    .update(`thinmirror/1 ${role}`)
    .update(Buffer.from([0]))
    .update(mirror, 'utf8')
    .update(Buffer.from([0]))
    .update(nonceP)
    .update(nonceS)
    .digest();
}

export function proofSecondary(psk: Buffer, mirror: string, nonceP: Buffer, nonceS: Buffer): Buffer {
  return proof('secondary', psk, mirror, nonceP, nonceS);
}

export function proofPrimary(psk: Buffer, mirror: string, nonceP: Buffer, nonceS: Buffer): Buffer {
  return proof('primary', psk, mirror, nonceP, nonceS);
}

/** Constant-time comparison; false for different lengths. */
export function verifyProof(expected: Buffer, got: Buffer): boolean {
  return expected.length === got.length && timingSafeEqual(expected, got);
}

export function newNonce(): Buffer {
  return randomBytes(NONCE_BYTES);
}
