import { ErrorCodes, TmError } from '../errors.js';
import { loadConfig } from '../daemon/config.js';
import { controlCall } from '../daemon/control.js';
import { checkDrillName, type DrillInfo, type DrillStarted, type DrillStopped } from '../mirror/drill.js';
import { formatEta } from './status.js';

export interface DrillOptions {
  name?: string | undefined;
  force: boolean;
  json: boolean;
}

/** How long a drill action may take on the daemon's side (start waits for the receiver's turn). */
const ACTION_TIMEOUT_MS = 60_000;

/**
 * `drill start MIRROR [--name NAME]`, `drill list`, `drill stop MIRROR NAME
 * [--force]`, each `--config FILE [--json]`: through the control socket of
 * the daemon running with FILE (docs/drills.md). Refusals come back coded
 * (TM_ERR_DRILL_*), printed by the caller, exit 1.
 */
export async function runDrill(configPath: string, args: string[], o: DrillOptions): Promise<number> {
  const [sub, ...pos] = args;
  const usage = (msg: string) => new TmError(ErrorCodes.USAGE, `drill ${sub ?? ''}: ${msg}`.replace('drill : ', 'drill: '));
  if (sub !== 'start' && sub !== 'list' && sub !== 'stop') throw usage(sub === undefined ? 'expected start, list or stop' : `unknown subcommand "${sub}" (expected start, list or stop)`);
  const want = { start: 1, list: 0, stop: 2 }[sub];
  if (pos.length !== want) throw usage(sub === 'start' ? 'expected MIRROR' : sub === 'stop' ? 'expected MIRROR NAME' : 'takes no argument');
  if (o.name !== undefined && sub !== 'start') throw usage('--name goes with drill start only');
  if (o.force && sub !== 'stop') throw usage('--force goes with drill stop only');
  if (o.name !== undefined) checkDrillName(o.name);
  if (sub === 'stop') checkDrillName(pos[1]!);
  const cfg = await loadConfig(configPath);
  const dir = cfg.node.stateDir;
  const m = encodeURIComponent(pos[0] ?? '');
  if (sub === 'start') {
    const r = await controlCall<{ drill: DrillStarted }>(dir, 'POST', `/mirrors/${m}/drills`, o.name === undefined ? {} : { name: o.name }, ACTION_TIMEOUT_MS);
    const d = r.drill;
    if (o.json) console.log(JSON.stringify(d, null, 2));
    else console.log(`${d.mirror}: drill ${d.name} started: ${d.path} holds generation ${d.generation} (cloned from ${d.from === 'base' ? 'the base image, a generation being applied' : 'the target'} in ${d.seconds.toFixed(2)} s)`);
    return 0;
  }
  if (sub === 'stop') {
    const r = await controlCall<{ drill: DrillStopped }>(dir, 'DELETE', `/mirrors/${m}/drills/${encodeURIComponent(pos[1]!)}${o.force ? '?force=1' : ''}`, undefined, ACTION_TIMEOUT_MS);
    const d = r.drill;
    if (o.json) console.log(JSON.stringify(d, null, 2));
    else {
      console.log(`${d.mirror}: drill ${d.name} stopped; ${d.deleted ? `${d.path} deleted` : `${d.path} was already gone`}`);
      if (d.uninspected > 0) console.log(`(${d.uninspected} processes of other users could not be checked: the daemon lacks CAP_SYS_PTRACE, see docs/drills.md)`);
      if (d.users.length > 0) console.log(`(forced: still held by ${d.users.map((u) => (u.kind === 'loop' ? u.device : `pid ${u.pid} (${u.command})`)).join(', ')}; its space comes back when they let go)`);
    }
    return 0;
  }
  const r = await controlCall<{ drills: DrillInfo[] }>(dir, 'GET', '/drills', undefined, ACTION_TIMEOUT_MS);
  console.log(o.json ? JSON.stringify(r.drills, null, 2) : formatDrills(r.drills));
  return 0;
}

/** The drills as a table: MIRROR DRILL GEN AGE CREATED PATH. */
export function formatDrills(drills: readonly DrillInfo[]): string {
  if (drills.length === 0) return 'no drills';
  const head = ['MIRROR', 'DRILL', 'GEN', 'AGE', 'CREATED', 'PATH'];
  const rows = drills.map((d) => [d.mirror, d.name, String(d.generation), formatEta(d.ageSeconds), d.createdAt, d.path]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  return [head, ...rows].map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n');
}
