import type { Logger } from 'pino';
import type { OpenVolumeOptions } from '../volume/factory.js';
import type { Volume } from '../volume/volume.js';
import type { Session } from '../wire/session.js';
import type { MirrorConfig } from './settings.js';
import type { MirrorState } from './state.js';

/** Everything a Mirror needs from the daemon that runs it besides its config entry. */
export interface MirrorContext {
  nodeName: string;
  /** The node's state directory; the mirror keeps its files in `stateDir/<name>/`. */
  stateDir: string;
  psk: Buffer;
  log: Logger;
  /** Writes state.json (default: atomically, fsynced); tests make saves fail here. */
  writeState?: (file: string, data: string) => Promise<void>;
  /** Opens the mirror's volume (default: the volume factory). */
  openVolume?: (path: string, o: OpenVolumeOptions) => Promise<Volume>;
  /**
   * Opens a session to the peer while primary (default: the WebSocket
   * transport to `config.peer`, with TLS for wss://). Rejects with a coded error.
   */
  connect?: (signal: AbortSignal) => Promise<Session>;
  /**
   * Bandwidth cap (the mirror's and its peer's token buckets): resolves when
   * `bytes` more may go on the wire. Absent: unlimited.
   */
  throttle?: (bytes: number, signal: AbortSignal) => Promise<void>;
  /** False when this node has no listener (no primary can reach its secondaries); undefined: not known. */
  listening?: boolean;
}

/**
 * The mirror's state as the running role sees it. The Mirror owns the file;
 * a role changes the state only through {@link set} and {@link update},
 * which save first and swap after: the state in memory is never ahead of
 * state.json, so a failed save cannot announce (to the next session, in
 * status) what is not durable.
 */
export interface StateStore {
  /**
   * The state as last saved, or null while a secondary has never been reached
   * by a primary. Frozen: read it again after an update (it is a new object).
   */
  readonly state: Readonly<MirrorState> | null;
  /** Save `s` as the whole state (first session of a secondary, first start of a primary); then it is the state. */
  set(s: MirrorState): Promise<void>;
  /**
   * Change the state: `change` edits a copy of it, the copy is saved, and only
   * then does it become the state; a failed save rejects and leaves the state
   * as it was, as on disk. `change` returning `false` means nothing changed:
   * nothing is saved. Updates run one at a time, each on the state the one
   * before left. Resolves to what `change` returned.
   */
  update<T>(change: (s: MirrorState) => T): Promise<T>;
  /** The state file (for messages). */
  readonly file: string;
  /** The mirror's own directory (bitmaps, tracking state). */
  readonly dir: string;
}

/** What a Mirror hands the role it runs. */
export interface RoleContext {
  /** A secondary agreed to a planned switchover at `generation` and its session has ended: the Mirror promotes it. */
  onSwitchover?: (generation: number) => void;
  config: MirrorConfig;
  ctx: MirrorContext;
  store: StateStore;
  openVolume: (path: string, o: OpenVolumeOptions) => Promise<Volume>;
  log: Logger;
}
