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

/** The mirror's state as the running role sees it: the Mirror owns the file, a role changes the fields and asks for a save. */
export interface StateStore {
  /** The state, or null while a secondary has never been reached by a primary. */
  readonly state: MirrorState | null;
  /** Replace the state (first session of a secondary, first start of a primary) and save it. */
  set(s: MirrorState): Promise<void>;
  /** Write the current state atomically. */
  save(): Promise<void>;
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
