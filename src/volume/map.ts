import { formatBytes } from '../util/units.js';
import { openVolume } from './factory.js';
import { totalBytes, type ByteRange } from './volume.js';

export interface MapResult {
  path: string;
  kind: 'file' | 'block' | 'memory';
  size: number;
  chunkSize: number;
  extents: ByteRange[];
  allocatedBytes: number;
}

/** The chunk-aligned allocation map of a volume, for `thinmirror map`. */
export async function describeMap(file: string, chunkSize: number): Promise<MapResult> {
  const v = await openVolume(file, { readOnly: true });
  try {
    const extents = await v.allocated(chunkSize);
    return { path: file, kind: v.kind, size: v.size, chunkSize, extents, allocatedBytes: totalBytes(extents) };
  } finally {
    await v.close();
  }
}

/** One line per extent, then a summary line. */
export function formatMap(m: MapResult): string {
  const w = String(m.size).length;
  const lines = m.extents.map((e) => `${String(e.offset).padStart(w)}..${String(e.offset + e.length).padEnd(w)}  ${formatBytes(e.length)}`);
  lines.push(
    `${m.path}: ${m.extents.length} extent${m.extents.length === 1 ? '' : 's'}, ${formatBytes(m.allocatedBytes)} allocated of ${formatBytes(m.size)} ` +
      `(${m.allocatedBytes} of ${m.size} bytes, chunk ${formatBytes(m.chunkSize)})`,
  );
  return lines.join('\n');
}
