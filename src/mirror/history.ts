import { randomBytes } from 'node:crypto';

/**
 * Generation history (issue 12 §2): each committed generation has an
 * identity, the node that created it, its number and a random id. Both sides
 * keep the chain of identities since the last full sync, bounded; when two
 * sides meet they find their last common generation by comparing the chains,
 * as DRBD does with its generation identifiers.
 */
export interface GenId {
  /** The node that created the generation (the primary then). */
  node: string;
  generation: number;
  /** 16 lowercase hex digits, random. */
  id: string;
}

/** Entries kept per mirror: older ones are dropped (a common generation older than this is not found: digests are compared instead). */
export const MAX_HISTORY = 256;
export const GEN_ID_RE = /^[0-9a-f]{16}$/;

export function newGenId(node: string, generation: number): GenId {
  return { node, generation, id: randomBytes(8).toString('hex') };
}

export function sameGen(a: GenId | null | undefined, b: GenId | null | undefined): boolean {
  return !!a && !!b && a.id === b.id && a.generation === b.generation && a.node === b.node;
}

const key = (g: GenId) => `${g.node}/${g.generation}/${g.id}`;

/** `history` with `g` appended (a full sync, `restart`, begins a new chain), at most MAX_HISTORY entries. */
export function appendHistory(history: readonly GenId[] | undefined, g: GenId, restart = false): GenId[] {
  const out = restart ? [g] : [...(history ?? []), g];
  return out.length > MAX_HISTORY ? out.slice(out.length - MAX_HISTORY) : out;
}

/** What two chains have in common, and what each holds past it. */
export interface HistoryComparison {
  /** The last generation both chains hold, or null. */
  common: GenId | null;
  /** Entries of `local` after the common one (all of `local` when there is none). */
  localAhead: GenId[];
  /** Entries of `remote` after the common one (all of `remote` when there is none). */
  remoteAhead: GenId[];
}

/**
 * The last common generation of two chains: the latest entry of `remote` that
 * `local` also holds. Chains of one mirror share a prefix and fork at most
 * once (at a failover), so the latest shared entry is the fork point.
 */
export function compareHistories(local: readonly GenId[], remote: readonly GenId[]): HistoryComparison {
  const at = new Map<string, number>();
  local.forEach((g, i) => at.set(key(g), i));
  for (let j = remote.length - 1; j >= 0; j--) {
    const i = at.get(key(remote[j]!));
    if (i !== undefined) return { common: remote[j]!, localAhead: local.slice(i + 1), remoteAhead: remote.slice(j + 1) };
  }
  return { common: null, localAhead: [...local], remoteAhead: [...remote] };
}

/** A primary's chain as the peer may know it: its committed generations, then its pending one (whose commit acknowledgement may have been lost). */
export function withPending(history: readonly GenId[] | undefined, pending: GenId | null | undefined): GenId[] {
  return [...(history ?? []), ...(pending ? [pending] : [])];
}

/** "g12 (site-a, 3f9c…)" for messages. */
export function describeGen(g: GenId | null | undefined): string {
  return g ? `generation ${g.generation} (${g.node} ${g.id.slice(0, 8)})` : 'no generation';
}

/** Both sides wrote after they diverged: what status shows until `resolve`. */
export interface SplitBrain {
  detectedAt: number;
  peerNode: string;
  /** The last generation both sides hold, or null when their histories share none. */
  common: GenId | null;
  /** Bytes changed here since `common` (null: not known). */
  localBytes: number | null;
  /** Bytes the peer changed since `common`, as it reported (null: not known). */
  peerBytes: number | null;
  why: string;
}
