import { ErrorCodes, TmError, type ErrorCode } from '../errors.js';
import type { DaemonConfig, MirrorConfig } from './config.js';

/**
 * Config reload (SIGHUP): what changes between the running config and a new
 * one, and whether the new one can be applied without a restart. Pure
 * functions; the daemon (src/daemon/daemon.ts) applies the result.
 */

/** The mirrors of a reload by name, as applied. */
export interface ReloadReport {
  added: string[];
  removed: string[];
  /** Stopped and started again with the new config. */
  changed: string[];
  /** Kept running as they were (no reconnect). */
  unchanged: string[];
}

/** The last reload as shown by GET /status (`config.lastReload`). */
export interface LastReload extends ReloadReport {
  /** ISO time the reload finished. */
  at: string;
  ok: boolean;
  /** Why the new config was rejected (the old one keeps running), or null. */
  error: { code: ErrorCode; message: string } | null;
}

/** How mirror configs differ. `added` and `changed` hold the new configs, `removed` the old ones. */
export interface MirrorDiff {
  added: MirrorConfig[];
  removed: MirrorConfig[];
  changed: MirrorConfig[];
  unchanged: MirrorConfig[];
}

/** A copy with the keys of every object sorted (arrays keep their order); undefined members dropped, as JSON does. */
function sorted(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(sorted);
  if (v !== null && typeof v === 'object') {
    const o = v as Record<string, unknown>;
    const out: Record<string, unknown> = {};
    for (const k of Object.keys(o).sort()) if (o[k] !== undefined) out[k] = sorted(o[k]);
    return out;
  }
  return v;
}

/** JSON of a key-sorted copy: equal for values that are deeply equal whatever the key order. */
export function canonicalJson(v: unknown): string {
  return JSON.stringify(sorted(v)) ?? 'undefined';
}

/**
 * Diff mirrors by name. A mirror is changed when anything of its resolved
 * config differs (role, volume, peer, sizes, tracking, caps...); with
 * `restartAll` (e.g. the pre-shared key changed) every mirror present in both
 * counts as changed, and so do those named in `restart` (e.g. they failed to
 * start). Results follow the order of `next` (`removed`: of `old`).
 */
export function diffMirrors(old: readonly MirrorConfig[], next: readonly MirrorConfig[], o: { restartAll?: boolean; restart?: Iterable<string> } = {}): MirrorDiff {
  const again = new Set(o.restart ?? []);
  const before = new Map(old.map((m) => [m.name, m]));
  const names = new Set(next.map((m) => m.name));
  const d: MirrorDiff = { added: [], removed: old.filter((m) => !names.has(m.name)), changed: [], unchanged: [] };
  for (const m of next) {
    const was = before.get(m.name);
    if (!was) d.added.push(m);
    else if (o.restartAll || again.has(m.name) || canonicalJson(was) !== canonicalJson(m)) d.changed.push(m);
    else d.unchanged.push(m);
  }
  return d;
}

/** Top-level keys a reload applies: mirrors (and `peers:`, folded into them), auth (the key is re-read), node (but see below). */
const RELOADABLE_TOP = new Set(['mirrors', 'peers', 'auth', 'node', 'sourcePath']);
/** Keys of `node:` a reload applies; the others (name, stateDir) need a restart. */
const RELOADABLE_NODE = new Set(['logLevel']);
/** Keys of `auth:` a reload applies. */
const RELOADABLE_AUTH = new Set(['pskFile']);

function changedKeys(a: Record<string, unknown>, b: Record<string, unknown>, keep: Set<string>, prefix: string): string[] {
  const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort();
  return keys.filter((k) => !keep.has(k) && canonicalJson(a[k]) !== canonicalJson(b[k])).map((k) => prefix + k);
}

/**
 * Keys that differ between two configs and cannot change without a restart:
 * node.name, node.stateDir, listen, metrics, tls and any other key outside
 * mirrors, peers, auth.pskFile and node.logLevel. Sorted; empty when the new
 * config can be applied by a reload.
 */
export function restartOnlyChanges(old: DaemonConfig, next: DaemonConfig): string[] {
  const a = old as unknown as Record<string, unknown>;
  const b = next as unknown as Record<string, unknown>;
  const obj = (v: unknown) => (v !== null && typeof v === 'object' ? (v as Record<string, unknown>) : {});
  return [
    ...changedKeys(obj(a.node), obj(b.node), RELOADABLE_NODE, 'node.'),
    ...changedKeys(obj(a.auth), obj(b.auth), RELOADABLE_AUTH, 'auth.'),
    ...changedKeys(a, b, RELOADABLE_TOP, ''),
  ].sort();
}

/** Throw TM_ERR_RELOAD naming the keys when `next` changes something only a restart can. */
export function checkReloadable(old: DaemonConfig, next: DaemonConfig): void {
  const keys = restartOnlyChanges(old, next);
  if (keys.length === 0) return;
  throw new TmError(
    ErrorCodes.RELOAD,
    `${next.sourcePath}: ${keys.join(', ')} changed; a reload cannot apply ${keys.length === 1 ? 'it' : 'them'}: restart the daemon to change ${keys.length === 1 ? 'it' : 'them'} (the old config keeps running)`,
  );
}

/** The names of a diff, for the report. */
export function reportOf(d: MirrorDiff): ReloadReport {
  const names = (l: MirrorConfig[]) => l.map((m) => m.name);
  return { added: names(d.added), removed: names(d.removed), changed: names(d.changed), unchanged: names(d.unchanged) };
}
