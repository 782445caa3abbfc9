import type { DaemonStatus, MirrorStatusEntry } from '../daemon/control.js';
import { formatBytes } from '../util/units.js';

const BAR_WIDTH = 20;

function pad(s: string, n: number): string {
  return s.length >= n ? s : s + ' '.repeat(n - s.length);
}

/** 42 -> "42s", 725 -> "12m05s", 11220 -> "3h07m", 190800 -> "2d05h". */
export function formatEta(seconds: number): string {
  const s = Math.max(0, Math.ceil(seconds));
  const two = (n: number) => String(n).padStart(2, '0');
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${two(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${two(Math.floor((s % 3600) / 60))}m`;
  return `${Math.floor(s / 86400)}d${two(Math.floor((s % 86400) / 3600))}h`;
}

/** "[#####...............]  25.0%" */
export function progressBar(done: number, total: number, width = BAR_WIDTH): string {
  const f = total > 0 ? Math.min(1, Math.max(0, done / total)) : 1;
  const n = Math.floor(f * width);
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}] ${(f * 100).toFixed(1).padStart(5)}%`;
}

/**
 * The generation in flight: bar, bytes done of total, rate and ETA (from the
 * daemon's rateBytesPerSecond); empty when nothing is in flight.
 */
export function progressCell(m: Pick<MirrorStatusEntry, 'progress' | 'rateBytesPerSecond'>): string {
  const p = m.progress;
  if (!p || p.totalBytes === 0) return '';
  const parts = [progressBar(p.doneBytes, p.totalBytes), `${formatBytes(p.doneBytes)} of ${formatBytes(p.totalBytes)}`];
  const rate = m.rateBytesPerSecond ?? null;
  const left = Math.max(0, p.totalBytes - p.doneBytes);
  if (rate === null) parts.push('rate: measuring');
  else if (rate <= 0) parts.push('0 B/s, stalled');
  else parts.push(`${formatBytes(Math.round(rate))}/s, ETA ${formatEta(left / rate)}`);
  return parts.join('  ');
}

/**
 * PAYLOAD: data payload bytes a primary sent (before compression) or a
 * secondary wrote to its target (after decompression). A secondary of a daemon
 * older than appliedBytes reported what it applied in sentBytes.
 */
export function payloadCell(m: Pick<MirrorStatusEntry, 'role' | 'sentBytes' | 'appliedBytes'>): string {
  return formatBytes(m.role === 'secondary' ? ((m.appliedBytes as number | undefined) ?? m.sentBytes) : m.sentBytes);
}

export function lagCell(m: Pick<MirrorStatusEntry, 'lagSeconds'>): string {
  if (m.lagSeconds === null) return '-';
  return m.lagSeconds < 100 ? `${m.lagSeconds.toFixed(1)}s` : formatEta(m.lagSeconds);
}

/**
 * A primary's compression: the mode, the codec in use, the ratio achieved
 * (payload bytes as sent / before compression) and, under auto, why. Empty
 * for a secondary (and a daemon older than the setting).
 */
export function compressionLine(m: Pick<MirrorStatusEntry, 'compression'>): string {
  const z = m.compression;
  if (!z) return '';
  const ratio = z.ratio === null ? 'no data sent yet' : `wire/payload ${z.ratio.toFixed(3)}`;
  const tried = z.lz4Ratio === null ? '' : `, lz4 ${z.lz4Ratio.toFixed(3)} where tried`;
  return `compression ${z.mode}, sending ${z.codec} (${ratio}${tried})${z.reason ? `: ${z.reason}` : ''}`;
}

/**
 * The readable form of `status`: one row per mirror, errors below the table.
 * PAYLOAD is what a primary sent or a secondary applied (see payloadCell).
 * PROGRESS (last column) is filled while a generation is in flight (the
 * initial sync or a cycle); LAG is the age of the oldest change not yet
 * committed on the secondary.
 */
export function formatStatus(st: DaemonStatus): string {
  const head = ['MIRROR', 'ROLE', 'STATE', 'GEN', 'COMMITTED', 'VOLUME', 'ALLOCATED', 'PAYLOAD', 'WIRE', 'DIRTY', 'LAG', 'PROGRESS'];
  const rows = st.mirrors.map((m) => [
    m.name,
    m.role,
    m.state,
    String(m.generation),
    String(m.committedGeneration),
    formatBytes(m.volumeBytes),
    formatBytes(m.allocatedBytes),
    payloadCell(m),
    formatBytes(m.wireBytes),
    formatBytes(m.dirtyBytes),
    lagCell(m),
    progressCell(m),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]) => r.map((c, i) => pad(c, widths[i]!)).join('  ').trimEnd();
  const where = [st.listen ? `listening on ${st.listen.host}:${st.listen.port}${st.listen.tls ? ' (mutual TLS)' : ''}` : '', st.metrics ? `metrics on http://${st.metrics.host}:${st.metrics.port}/metrics` : ''].filter(Boolean);
  const out = [`node ${st.node} (pid ${st.pid}, thinmirror ${st.version})${where.map((w) => `, ${w}`).join('')}`, line(head), ...rows.map(line)];
  for (const m of st.mirrors) if (m.error) out.push(`${m.name}: ${m.error.code}: ${m.error.message}`);
  for (const m of st.mirrors) {
    if (m.roleConflict) out.push(`${m.name}: ${m.roleConflict}`);
    const sb = m.splitBrain;
    if (sb) {
      out.push(
        `${m.name}: split brain with ${sb.peerNode}: ${sb.why}; common generation ${sb.common ? sb.common.generation : 'none'}; changed here ${sb.localBytes ?? 'unknown'} bytes, there ${sb.peerBytes ?? 'unknown'} bytes; resolve: ${sb.resolve}`,
      );
    }
    const d = m.divergence;
    if (d) out.push(`${m.name}: ${d.unknown ? 'changed chunks not known' : `${d.bytes} bytes`} changed here that the peer never committed (${d.reason}): overwritten by the peer at the next resync`);
  }
  for (const m of st.mirrors) {
    const line = compressionLine(m);
    if (line) out.push(`${m.name}: ${line}`);
  }
  for (const m of st.mirrors) for (const d of m.drills ?? []) out.push(`${m.name}: drill ${d.name}, generation ${d.generation}, ${formatEta(d.ageSeconds)} old: ${d.path}`);
  // (st.config is absent when asking a daemon older than config reload.)
  const r = st.config?.lastReload;
  if (r && !r.ok && r.error) out.push(`config reload at ${r.at} failed, the previous config keeps running: ${r.error.code}: ${r.error.message}`);
  return out.join('\n');
}
