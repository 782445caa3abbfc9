import { loopbackPair, writeLoopbackPair, type LoopbackMirror, type PairConfigs } from '../../src/cli/loopback-pair.js';

/*
 * Configs of a loopback pair of daemons for integration tests and benches:
 * the demo's pair (src/cli/loopback-pair.ts, product code the demo runs) plus
 * the knobs only tests turn. Tests and benches import all of it from here.
 */
export { freePort, startPair, type PairConfigs } from '../../src/cli/loopback-pair.js';
export { sha256File } from '../../src/util/sha256.js';

export interface PairOptions {
  dir: string;
  mirror: string;
  source: string;
  target: string;
  port: number;
  /** Port the primary connects to (default `port`; a test proxy sits between). */
  peerPort?: number;
  /** The primary's chunk size (default 64KiB); the secondary keeps its default. */
  chunkSize?: string;
  /** Change source cycle (default 1s). */
  interval?: string;
  /** Keys added to (or replacing those of) the primary's mirror entries, e.g. `tracking:`, `reconnect:`. */
  extraPrimary?: Record<string, unknown>;
  /** Keys added to the secondary's mirror entries, e.g. `checkpoint:`. */
  extraSecondary?: Record<string, unknown>;
}

/** Write a pre-shared key and the two daemons' configs for one mirror on loopback. */
export function writePairConfigs(o: PairOptions): Promise<PairConfigs> {
  return writeMirrorConfigs({ ...o, mirrors: [{ name: o.mirror, source: o.source, target: o.target }] });
}

/**
 * Write a pre-shared key and the two daemons' configs for several mirrors
 * between the same two daemons on loopback; `primaryTop` adds top-level keys
 * to the primary's config (e.g. `peers:`).
 */
export function writeMirrorConfigs(
  o: Omit<PairOptions, 'mirror' | 'source' | 'target'> & { mirrors: LoopbackMirror[]; primaryTop?: Record<string, unknown> },
): Promise<PairConfigs> {
  const pair = loopbackPair({ dir: o.dir, port: o.port, mirrors: o.mirrors, interval: o.interval ?? '1s' });
  Object.assign(pair.primary, o.primaryTop);
  for (const m of pair.primary.mirrors) {
    if (o.peerPort !== undefined) m.peer = `ws://127.0.0.1:${o.peerPort}`;
    if (o.chunkSize !== undefined) m.chunkSize = o.chunkSize;
    Object.assign(m, o.extraPrimary);
  }
  for (const m of pair.secondary.mirrors) Object.assign(m, o.extraSecondary);
  return writeLoopbackPair(pair);
}
