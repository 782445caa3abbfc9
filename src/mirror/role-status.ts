import type { MirrorState } from './state.js';
import type { MirrorStatus } from './status.js';

/** The fields of issue 12 in a running role's status, from its state. */
export function roleStatus(s: MirrorState | null, mirror: string): Pick<MirrorStatus, 'lastGeneration' | 'divergence' | 'splitBrain'> {
  const d = s?.divergence ?? null;
  const sb = s?.splitBrain ?? null;
  return {
    lastGeneration: s?.history?.at(-1) ?? null,
    divergence: d ? { bytes: d.bytes, unknown: d.unknown, reason: d.reason, since: d.since } : null,
    splitBrain: sb ? { ...sb, resolve: `thinmirror resolve ${mirror} --discard-local --config FILE, on the side whose changes since the common generation are thrown away` } : null,
  };
}
