import type { DaemonStatus } from '../daemon/control.js';
import type { MirrorStatus } from '../mirror/status.js';
import { formatBytes } from '../util/units.js';

function pad(s: string, n: number): string {
  return s.length >= n ? s : s + ' '.repeat(n - s.length);
}

function progressCell(m: MirrorStatus): string {
  if (!m.progress || m.progress.totalBytes === 0) return '';
  const pct = Math.min(100, (100 * m.progress.doneBytes) / m.progress.totalBytes);
  return `${pct.toFixed(1)}%`;
}

function lagCell(m: MirrorStatus): string {
  if (m.lagSeconds === null) return '-';
  return m.lagSeconds < 100 ? `${m.lagSeconds.toFixed(1)}s` : `${Math.round(m.lagSeconds)}s`;
}

/** The readable form of `status`: one row per mirror, errors below the table. */
export function formatStatus(st: DaemonStatus): string {
  const head = ['MIRROR', 'ROLE', 'STATE', 'PROGRESS', 'GEN', 'COMMITTED', 'VOLUME', 'ALLOCATED', 'SENT', 'WIRE', 'DIRTY', 'LAG'];
  const rows = st.mirrors.map((m) => [
    m.name,
    m.role,
    m.state,
    progressCell(m),
    String(m.generation),
    String(m.committedGeneration),
    formatBytes(m.volumeBytes),
    formatBytes(m.allocatedBytes),
    formatBytes(m.sentBytes),
    formatBytes(m.wireBytes),
    formatBytes(m.dirtyBytes),
    lagCell(m),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]) => r.map((c, i) => pad(c, widths[i]!)).join('  ').trimEnd();
  const out = [`node ${st.node} (pid ${st.pid}, thinmirror ${st.version})${st.listen ? `, listening on ${st.listen.host}:${st.listen.port}` : ''}`, line(head), ...rows.map(line)];
  for (const m of st.mirrors) if (m.error) out.push(`${m.name}: ${m.error.code}: ${m.error.message}`);
  return out.join('\n');
}
