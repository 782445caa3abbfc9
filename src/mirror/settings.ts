import type { TrackingMode } from '../track/source.js';
import type { TlsFiles } from '../wire/tls.js';

/**
 * One mirror as the config resolves it (defaults applied, sizes in bytes,
 * durations in seconds). Defined here, below the daemon that parses it, so
 * that the mirror layer never imports upward.
 */
export const CONSISTENCY_MODES = ['auto', 'reflink', 'journal', 'off'] as const;
/**
 * How a secondary keeps a consistent image while a generation is applied:
 * `reflink` a FICLONE base image of the last committed generation, `journal`
 * an undo journal, `off` none; `auto` picks reflink where the target's
 * filesystem has it, journal elsewhere.
 */
export type ConsistencyMode = (typeof CONSISTENCY_MODES)[number];

export const COMPRESSION_MODES = ['auto', 'lz4', 'off'] as const;
/**
 * Whether a primary compresses its data extents: `lz4` always tries (a piece
 * that does not shrink enough goes raw), `off` never, `auto` only while that
 * raises the rate at which allocated data reaches the secondary (compression.ts).
 */
export type CompressionMode = (typeof COMPRESSION_MODES)[number];

/** Default of {@link MirrorConfig.peerTimeout}, seconds: far above a commit's fdatasync or a 64 MiB digest window on a slow disk. */
export const DEFAULT_PEER_TIMEOUT = 120;

export interface MirrorConfig {
  name: string;
  /** The role the mirror starts with when it has no state yet; afterwards the state's role (changed by promote/demote) runs, and a config that differs is reported in status. */
  role: 'primary' | 'secondary';
  /** Path of the volume (source on a primary, target on a secondary): a file, a block device, or memory:NAME. */
  volume: string;
  /** ws:// or wss:// URL of the other side, used while this side is primary (a secondary may name it for after a promote). */
  peer?: string;
  /** A primary with a wss:// peer: the mirror's own `tls:` files, else the node's. */
  tls?: TlsFiles;
  /** Plain ws:// accepted off loopback: to the peer (primary), on the listener (secondary). */
  insecure: boolean;
  chunkSize: number;
  maxInFlight: number;
  maxExtent: number;
  checkpointBytes: number;
  checkpointInterval: number;
  reconnectMin: number;
  reconnectMax: number;
  tracking: { mode: TrackingMode; interval: number };
  /** Secondary: how the replica stays consistent while a generation is applied. */
  consistency: ConsistencyMode;
  /** Secondary: where base images and journals live (default: `.thinmirror/<name>/` next to a file target; the mirror's state directory for a block device). */
  consistencyDir?: string;
  /** LVM thin pool of the volume (`tracking.mode: lvm-thin`): volume group and pool name. */
  lvm?: { vg: string; pool: string };
  /** Primary: how data extents are compressed; absent: auto (the config always sets it). */
  compression?: CompressionMode;
  /** Cap of this mirror's sends in bytes per second (primary only); absent: unlimited. */
  bandwidth?: number;
  /**
   * Primary: seconds the secondary may stay silent while something awaits its
   * answer (extents unacknowledged, a commit, a digest request) before the
   * session ends with TM_ERR_TIMEOUT. Not in the YAML config; default
   * DEFAULT_PEER_TIMEOUT (tests shorten it).
   */
  peerTimeout?: number;
  /** Cap shared by every mirror to the same peer (from `peers:`), bytes per second; absent: unlimited. */
  peerBandwidth?: number;
}
