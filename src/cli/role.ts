import { loadConfig } from '../daemon/config.js';
import { controlCall, type RoleAction } from '../daemon/control.js';
import type { RoleChangeReport } from '../mirror/mirror.js';

/** How long a role action may take on the daemon's side (a switchover waits for the last cycle; a promote for a rollback). */
const ACTION_TIMEOUT_MS = 15 * 60_000;

/**
 * `promote MIRROR [--force]`, `demote MIRROR`, `switchover MIRROR`,
 * `resolve MIRROR --discard-local`, each `--config FILE [--json]`: through the
 * control socket of the daemon running with FILE (docs/runbook.md). Refusals
 * come back coded and are printed by the caller (exit 1).
 */
export async function runRoleAction(configPath: string, action: RoleAction, mirror: string, o: { force: boolean; discardLocal: boolean; json: boolean }): Promise<number> {
  const cfg = await loadConfig(configPath);
  const r = await controlCall<{ result: RoleChangeReport }>(cfg.node.stateDir, 'POST', `/mirrors/${encodeURIComponent(mirror)}/${action}`, { force: o.force, discardLocal: o.discardLocal }, ACTION_TIMEOUT_MS);
  console.log(o.json ? JSON.stringify(r.result, null, 2) : formatRoleChange(action, r.result));
  return 0;
}

export function formatRoleChange(action: RoleAction, r: RoleChangeReport): string {
  const lines = [`${r.mirror}: ${action}: this side is now ${r.role} at generation ${r.committedGeneration} (${r.seconds.toFixed(2)} s)`];
  if (r.undone !== null) lines.push(`  generation ${r.undone} was partly applied and was rolled back`);
  if (r.divergentBytes !== null && r.divergentBytes > 0) lines.push(`  ${r.divergentBytes} bytes changed here that the peer never committed: kept, overwritten by the peer's data at the next resync`);
  if (r.divergentBytes === null && r.role === 'secondary') lines.push(`  the chunks changed here are not known: the next resync compares digests`);
  for (const w of r.warnings) lines.push(`  warning: ${w}`);
  return lines.join('\n');
}
