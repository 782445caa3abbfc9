import type { MirrorConfig } from '../daemon/config.js';
import { ErrorCodes, TmError } from '../errors.js';
import type { Volume } from '../volume/volume.js';
import { ReflinkSource, reflinkUsable } from './reflink.js';
import { ScanSource } from './scan.js';
import type { ChangeSource } from './source.js';

/**
 * The change source a primary mirror's `tracking.mode` asks for. `auto` picks
 * reflink when the volume is a regular file and the state directory is on its
 * filesystem with FICLONE working, scan otherwise; `reason` says why.
 */
export async function createSource(c: MirrorConfig, volume: Volume, stateDir: string): Promise<{ source: ChangeSource; reason?: string }> {
  const mode = c.tracking.mode;
  if (mode === 'scan') return { source: new ScanSource(volume, c.chunkSize, stateDir) };
  if (mode === 'reflink' || mode === 'auto') {
    const probe = await reflinkUsable(c.volume, stateDir);
    if (probe.ok) {
      return { source: new ReflinkSource(c.volume, volume.size, c.chunkSize, stateDir), ...(mode === 'auto' ? { reason: `reflink works in ${stateDir}` } : {}) };
    }
    if (mode === 'reflink') {
      throw new TmError(ErrorCodes.TRACKING, `mirror ${c.name}: tracking.mode reflink cannot work: ${probe.reason}; put node.stateDir on the volume's XFS (reflink=1) or btrfs filesystem, or use tracking.mode auto or scan`);
    }
    return { source: new ScanSource(volume, c.chunkSize, stateDir), reason: `${probe.reason}; using scan` };
  }
  throw new TmError(ErrorCodes.TRACKING, `mirror ${c.name}: tracking.mode ${mode} is not available yet`);
}
