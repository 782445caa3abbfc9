import { ErrorCodes, TmError } from '../errors.js';
import type { Volume } from '../volume/volume.js';
import * as path from 'node:path';
import { BlockDeviceVolume } from '../volume/block-device.js';
import { SystemLvm } from './lvm.js';
import { LvmThinSource } from './lvm-thin.js';
import { ReflinkSource, reflinkUsable } from './reflink.js';
import { ScanSource } from './scan.js';
import type { ChangeSource, SourceConfig } from './source.js';

/**
 * The change source a primary mirror's `tracking.mode` asks for. `auto` picks
 * reflink when the volume is a regular file and the state directory is on its
 * filesystem with FICLONE working, scan otherwise; `reason` says why.
 */
export async function createSource(c: SourceConfig, volume: Volume, stateDir: string): Promise<{ source: ChangeSource; reason?: string }> {
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
  if (mode === 'lvm-thin' && c.lvm) {
    // Not exercised against real LVM here (no device-mapper in this kernel): docs/lvm-thin.md.
    return {
      source: new LvmThinSource({
        vg: c.lvm.vg,
        lv: path.basename(c.volume),
        pool: c.lvm.pool,
        chunkSize: c.chunkSize,
        volumeSize: volume.size,
        stateDir,
        lvm: new SystemLvm(),
        openView: (device, allocated) => BlockDeviceVolume.open(device, { readOnly: true, allocated }),
      }),
    };
  }
  throw new TmError(ErrorCodes.TRACKING, `mirror ${c.name}: tracking.mode ${mode} needs lvm: { pool: VG/POOL }`);
}
