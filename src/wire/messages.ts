/**
 * thinmirror wire protocol, version 3: the message types. One WebSocket per
 * mirror; every WebSocket message is one binary frame holding one msgpackr-encoded
 * object with a `type` discriminant. docs/protocol.md describes the exchange.
 *
 * Units: every offset and length is in bytes; `chunkSize` is bytes;
 * `generation` counts from 1; `seq` counts extents sent in a session from 1.
 */

/**
 * 2: data extents carry `crc32c` (CRC-32C) instead of version 1's `crc32`
 * (zlib CRC-32). 3: the proofs cover the node names and the auth frame's volume
 * identity, and every frame after the handshake carries a MAC under a session key
 * (auth.ts). 4: `begin` may carry `viewAt`, and the primary sends `unchanged`
 * after a detection pass that found nothing changed (issue 15: the replica's
 * age on the secondary); a version-3 peer would refuse both, so the version
 * moved. 5: a data extent may carry `runs`, several pieces of the volume in
 * one frame (scattered small changes); a version-4 peer would refuse it. A peer
 * of another version is refused with TM_ERR_VERSION_MISMATCH.
 */
export const PROTOCOL_VERSION = 5;

/** Nonces and HMAC-SHA256 proofs are exactly this many bytes. */
export const NONCE_BYTES = 32;
export const PROOF_BYTES = 32;
/** Longest node or mirror name accepted on the wire. */
export const MAX_NAME_LENGTH = 128;
/** Largest data extent payload (uncompressed) a peer may send: 8 MiB. */
export const MAX_EXTENT_BYTES = 8 * 1024 * 1024;
/** Most pieces one data extent may carry in `runs`. */
export const MAX_EXTENT_RUNS = 1024;
/** Longest error message carried on the wire. */
export const MAX_ERROR_MESSAGE = 1024;
/**
 * Largest frame accepted before the peer has proven the key: the biggest
 * handshake frame is an error frame (1024 UTF-16 units, at most 3 bytes each
 * in UTF-8, plus its code and keys), under 3.2 KiB. Larger ones are refused
 * without being decoded (TM_ERR_PREAUTH_LIMIT).
 */
export const MAX_HANDSHAKE_FRAME_BYTES = 4096;

/** Primary -> secondary, first frame of a session. */
export interface HelloMsg {
  type: 'hello';
  version: number;
  node: string;
  mirror: string;
  nonce: Buffer;
}

/** Secondary -> primary: its nonce and its proof of the key. */
export interface ChallengeMsg {
  type: 'challenge';
  version: number;
  node: string;
  nonce: Buffer;
  proof: Buffer;
}

/** Primary -> secondary: its proof of the key, and the volume's identity. */
export interface AuthMsg {
  type: 'auth';
  proof: Buffer;
  volumeSize: number;
  chunkSize: number;
  /** Random id of the source volume, fixed for the mirror's life (hex). */
  volumeId: string;
  /**
   * The primary has no tracking state for this mirror (new, or its state
   * directory was lost): a secondary that holds a replica under another volume
   * id may adopt this id, and the two compare digests instead of starting over.
   * Absent or false: a different volume id is refused (TM_ERR_IDENTITY_MISMATCH).
   */
  fresh?: boolean;
}

/** Secondary -> primary: session accepted; where the secondary stands. */
export interface ReadyMsg {
  type: 'ready';
  /** Last generation applied, flushed and persisted; 0 = none. */
  committedGeneration: number;
  /** A generation partly applied: every chunk of it below `cursor` (bytes) is durable. */
  applying: { generation: number; cursor: number } | null;
}

/** Primary -> secondary: generation `generation` starts; extents below `resumeFrom` are not resent. */
export interface BeginMsg {
  type: 'begin';
  generation: number;
  resumeFrom: number;
  /** The generation's identity (the secondary adds it to its history at commit). */
  gid?: WireGenId;
  /** This generation also overwrites the chunks the secondary reported as divergent in this session's history. */
  withPeerChanges?: boolean;
  /** Unix ms (the primary's clock) when the view this generation is read from was taken; absent when not known. */
  viewAt?: number;
}

/**
 * Primary -> secondary, between generations (protocol 4): a detection pass on
 * a view taken at `viewAt` (Unix ms, the primary's clock) found the volume
 * unchanged from committed generation `generation`, so the replica is the
 * source as it was then.
 */
export interface UnchangedMsg {
  type: 'unchanged';
  generation: number;
  viewAt: number;
}

/** A generation's identity on the wire (mirror/history.ts GenId). */
export interface WireGenId {
  node: string;
  generation: number;
  /** 16 lowercase hex digits. */
  id: string;
}

/** Most history entries a history frame carries. */
export const MAX_HISTORY_WIRE = 256;
/** Largest divergent-chunks bitmap (portable roaring) a history frame carries. */
export const MAX_DIVERGENT_BYTES = 16 * 1024 * 1024;

/**
 * Either side, right after the handshake (the primary first, then the
 * secondary's answer): its role, its chain of committed generations and what
 * it changed that the other side may not hold. They find their common
 * generation from it (reverse resync, split brain: docs/runbook.md).
 */
export interface HistoryMsg {
  type: 'history';
  role: 'primary' | 'secondary';
  ids: WireGenId[];
  /** Primary: its pending generation (a committed ack may have been lost). */
  pending: WireGenId | null;
  /** Bytes this side changed since its last committed generation that the peer does not hold; null when not known. */
  changedBytes: number | null;
  /** Secondary: those chunks as a portable roaring bitmap of chunk indices; null when none or not known. */
  divergent: Buffer | null;
  /** Secondary: it changed chunks since its last committed generation but does not know which (digests must be compared). */
  unknown: boolean;
}

/** Primary -> secondary, between generations: planned switchover; the secondary holds `generation` and will be promoted. */
export interface SwitchoverMsg {
  type: 'switchover';
  generation: number;
}

/** Secondary -> primary: ready to be promoted at `generation` once the primary has closed the session. */
export interface SwitchedMsg {
  type: 'switched';
  generation: number;
}

export type ExtentKind = 'data' | 'zero' | 'trim';

/** Primary -> secondary: one run of chunks. */
export interface ExtentMsg {
  type: 'extent';
  seq: number;
  kind: ExtentKind;
  offset: number;
  length: number;
  /** data only: 'raw' or 'lz4' (payload compressed, decompresses to `length` bytes). */
  codec?: 'raw' | 'lz4';
  /** data only: CRC-32C (Castagnoli) of the uncompressed bytes. */
  crc32c?: number;
  /** data only. */
  payload?: Buffer;
  /**
   * data only, absent when the payload covers the whole range: the pieces of
   * [offset, offset + length) the payload holds, one after the other, as
   * [start, length, start, length, ...] relative to `offset` (at least two
   * pieces, ascending, not overlapping, the first at 0, the last ending at
   * `length`). What lies between them is not part of the extent: the
   * secondary leaves it as it is. `codec` and `crc32c` cover the joined
   * bytes of the pieces ({@link dataBytes}).
   */
  runs?: number[];
}

/** The volume's byte ranges a data extent's `runs` name (absolute offsets). */
export function runsToPieces(offset: number, runs: readonly number[]): { offset: number; length: number }[] {
  const out = new Array<{ offset: number; length: number }>(runs.length / 2);
  for (let i = 0; i < runs.length; i += 2) out[i / 2] = { offset: offset + runs[i]!, length: runs[i + 1]! };
  return out;
}

/** Bytes a data extent's payload holds uncompressed: its `length`, or the sum of its runs' lengths. */
export function dataBytes(msg: Pick<ExtentMsg, 'length' | 'runs'>): number {
  const runs = msg.runs;
  if (!runs) return msg.length;
  let n = 0;
  for (let i = 1; i < runs.length; i += 2) n += runs[i]!;
  return n;
}

/** Primary -> secondary: all extents of the generation have been sent. */
export interface CommitMsg {
  type: 'commit';
  generation: number;
}

/**
 * Secondary -> primary: extents up to `seq` are applied (releases flow-control
 * credit); `durable` is the cursor (bytes) below which the current generation is
 * flushed and persisted.
 */
export interface AckMsg {
  type: 'ack';
  seq: number;
  durable: number;
}

/** Secondary -> primary: generation applied, flushed, persisted. */
export interface CommittedMsg {
  type: 'committed';
  generation: number;
}

/** Largest range one digest-req may ask for: 64 MiB. */
export const MAX_DIGEST_RANGE = 64 * 1024 * 1024;
/** Bytes per chunk digest (SHA-256 truncated; all-zero chunks: 16 zero bytes); defined with the digest. */
export { DIGEST_BYTES } from '../volume/digest.js';

/**
 * Primary -> secondary, between generations: send the digests of the target's
 * chunks in [offset, offset + length) (reconciliation after lost tracking state).
 */
export interface DigestReqMsg {
  type: 'digest-req';
  offset: number;
  length: number;
}

/** Secondary -> primary: DIGEST_BYTES per chunk of the requested range, in order. */
export interface DigestsMsg {
  type: 'digests';
  offset: number;
  length: number;
  digests: Buffer;
}

/** Either side: the session ends because of this error. */
export interface ErrorMsg {
  type: 'error';
  code: string;
  message: string;
}

export type Message =
  | HelloMsg
  | ChallengeMsg
  | AuthMsg
  | ReadyMsg
  | BeginMsg
  | ExtentMsg
  | CommitMsg
  | AckMsg
  | CommittedMsg
  | DigestReqMsg
  | DigestsMsg
  | HistoryMsg
  | SwitchoverMsg
  | SwitchedMsg
  | UnchangedMsg
  | ErrorMsg;

export type MessageType = Message['type'];

/**
 * What the decoder knows about the session, so that it can check ranges before
 * anything acts on a message. Before the handshake has settled the volume, both
 * are undefined and range checks on extents fail.
 */
export interface DecodeContext {
  volumeSize?: number;
  chunkSize?: number;
}

/** WebSocket close codes used by thinmirror (4000-4999 are private use). */
export const CloseCodes = {
  /** Normal end. */
  NORMAL: 1000,
  /** The peer sent a coded error (see the preceding error frame). */
  REFUSED: 4001,
  /** Protocol violation detected locally. */
  PROTOCOL: 4002,
} as const;
