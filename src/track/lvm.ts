/**
 * The one interface between `tracking.mode: lvm-thin` and LVM / device-mapper.
 * Everything LvmThinSource does to the system goes through {@link LvmCommands}:
 * {@link SystemLvm} runs the real commands; tests drive the source against a
 * test double (test/helpers/fake-lvm.ts) because this kernel has no
 * device-mapper.
 */
import { ErrorCodes, TmError } from '../errors.js';
import { runTool } from './thin-meta.js';

export interface LvmCommands {
  /**
   * Create `snap`, a read-only thin snapshot of thin volume VG/LV, activated
   * now and at boot (no activation-skip flag), so its device can be read.
   */
  createThinSnapshot(vg: string, lv: string, snap: string): Promise<void>;
  /** Make VG/NAME active (also when it carries the activation-skip flag). */
  activateLv(vg: string, name: string): Promise<void>;
  /** Remove VG/NAME (active or not). The caller has closed its device. */
  removeLv(vg: string, name: string): Promise<void>;
  /** Names of the logical volumes in VG (hidden ones left out). */
  listLvs(vg: string): Promise<string[]>;
  /** The pool's device id of thin volume VG/LV (`lvs -o thin_id`). */
  thinDeviceId(vg: string, lv: string): Promise<number>;
  /** The block device of VG/LV. */
  devicePath(vg: string, lv: string): string;
  /** The pool's metadata device, which `thin_dump -m` / `thin_delta -m` read. */
  poolMetadataPath(vg: string, pool: string): string;
  /** The block of the metadata snapshot the pool holds, null when it holds none. */
  heldMetadataRoot(vg: string, pool: string): Promise<number | null>;
  /** Take the pool's metadata snapshot (fails when one is held already). */
  reserveMetadataSnap(vg: string, pool: string): Promise<void>;
  /** Drop the pool's metadata snapshot (fails when none is held). */
  releaseMetadataSnap(vg: string, pool: string): Promise<void>;
}

/** Names LVM accepts for VGs and LVs (lvm(8) "VALID NAMES"); anything else is refused before it reaches a command line. */
const LVM_NAME = /^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$/;

export function checkLvmName(name: string, what: string): void {
  if (!LVM_NAME.test(name) || name === '.' || name === '..' || name.length > 127) {
    throw new TmError(ErrorCodes.CONFIG, `${what} ${JSON.stringify(name)} is not a valid LVM name (letters, digits, + _ . -, not starting with -)`);
  }
}

/** The device-mapper name LVM gives VG/LV: each '-' inside a name doubled, then joined by '-'. */
export function dmName(vg: string, lv: string): string {
  return `${vg.replace(/-/g, '--')}-${lv.replace(/-/g, '--')}`;
}

/**
 * Parse `dmsetup status` of a thin-pool target (kernel
 * Documentation/admin-guide/device-mapper/thin-provisioning.rst, "Status"):
 * `<start> <length> thin-pool <transaction id> <used>/<total metadata blocks>
 * <used>/<total data blocks> <held metadata root> ro|rw|...`.
 * The held root is '-' when there is none.
 */
export function parseHeldMetadataRoot(statusLine: string, what: string): number | null {
  const f = statusLine.trim().split(/\s+/);
  if (f[2] !== 'thin-pool') throw new TmError(ErrorCodes.LVM, `${what}: not a thin-pool target: ${JSON.stringify(statusLine.trim())}`);
  if (f[3] === 'Fail') throw new TmError(ErrorCodes.LVM, `${what}: the thin pool has failed`);
  const held = f[6];
  if (held === '-') return null;
  if (held === undefined || !/^\d+$/.test(held)) throw new TmError(ErrorCodes.LVM, `${what}: cannot read the held metadata root from ${JSON.stringify(statusLine.trim())}`);
  return Number(held);
}

/**
 * The real LVM and device-mapper commands, run with execFile-style spawns (no
 * shell). NOT EXERCISED HERE: this kernel has no device-mapper, so no thin pool
 * can exist on the machine the tests run on. The commands and their options
 * follow lvcreate(8), lvchange(8), lvremove(8), lvs(8), lvmthin(7),
 * dmsetup(8) and the kernel's thin-provisioning documentation (see
 * docs/lvm-thin.md); the unit tests cover the parsing helpers only.
 */
export class SystemLvm implements LvmCommands {
  async createThinSnapshot(vg: string, lv: string, snap: string): Promise<void> {
    checkLvmName(vg, 'volume group');
    checkLvmName(lv, 'logical volume');
    checkLvmName(snap, 'snapshot');
    // -s without a size on a thin LV makes a thin snapshot in the same pool.
    // Thin snapshots get the activation-skip flag by default (lvmthin(7));
    // -kn clears it so that -ay activates it now and at boot. -pr: nobody
    // writes to the frozen image.
    await runTool('lvcreate', ['--snapshot', '--setactivationskip', 'n', '--activate', 'y', '--permission', 'r', '--name', snap, `${vg}/${lv}`]);
  }

  async activateLv(vg: string, name: string): Promise<void> {
    checkLvmName(vg, 'volume group');
    checkLvmName(name, 'logical volume');
    await runTool('lvchange', ['--activate', 'y', '--ignoreactivationskip', `${vg}/${name}`]);
  }

  async removeLv(vg: string, name: string): Promise<void> {
    checkLvmName(vg, 'volume group');
    checkLvmName(name, 'logical volume');
    // --force: no "remove active logical volume?" prompt.
    await runTool('lvremove', ['--force', `${vg}/${name}`]);
  }

  async listLvs(vg: string): Promise<string[]> {
    checkLvmName(vg, 'volume group');
    const out = await runTool('lvs', ['--noheadings', '--options', 'lv_name', vg]);
    return out
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l !== '');
  }

  async thinDeviceId(vg: string, lv: string): Promise<number> {
    checkLvmName(vg, 'volume group');
    checkLvmName(lv, 'logical volume');
    const out = (await runTool('lvs', ['--noheadings', '--options', 'thin_id', `${vg}/${lv}`])).trim();
    if (!/^\d+$/.test(out)) throw new TmError(ErrorCodes.LVM, `lvs -o thin_id ${vg}/${lv} printed ${JSON.stringify(out)}: is it a thin volume?`);
    return Number(out);
  }

  devicePath(vg: string, lv: string): string {
    return `/dev/mapper/${dmName(vg, lv)}`;
  }

  poolMetadataPath(vg: string, pool: string): string {
    // The pool's hidden metadata sub-LV, active while the pool is.
    return `/dev/mapper/${dmName(vg, `${pool}_tmeta`)}`;
  }

  /** The dm device that takes pool messages: `VG-POOL-tpool` (lvmthin(7)). */
  private poolTarget(vg: string, pool: string): string {
    checkLvmName(vg, 'volume group');
    checkLvmName(pool, 'thin pool');
    return `${dmName(vg, pool)}-tpool`;
  }

  async heldMetadataRoot(vg: string, pool: string): Promise<number | null> {
    const target = this.poolTarget(vg, pool);
    const out = await runTool('dmsetup', ['status', target]);
    return parseHeldMetadataRoot(out, `dmsetup status ${target}`);
  }

  async reserveMetadataSnap(vg: string, pool: string): Promise<void> {
    // The kernel answers EBUSY ("Device or resource busy") when a metadata
    // snapshot is held already; LvmThinSource releases a leftover one first.
    await runTool('dmsetup', ['message', this.poolTarget(vg, pool), '0', 'reserve_metadata_snap']);
  }

  async releaseMetadataSnap(vg: string, pool: string): Promise<void> {
    // EINVAL when none is held.
    await runTool('dmsetup', ['message', this.poolTarget(vg, pool), '0', 'release_metadata_snap']);
  }
}
