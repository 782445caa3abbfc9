/**
 * Test doubles and fixtures for `tracking.mode: lvm-thin`. This kernel has no
 * device-mapper, so no real thin pool can exist here: {@link FakeLvm} is a
 * TEST DOUBLE of LVM whose pool metadata is nevertheless real — every time a
 * metadata snapshot is reserved it writes the pool's mappings as XML, builds a
 * real metadata file with `thin_restore`, and holds a metadata snapshot in it
 * the way the kernel does (superblock copied to a free block, `held_root`
 * set), so `thin_delta -m` / `thin_dump -m` really run on it. Snapshot devices
 * are sparse files.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, openSync, readSync, rmSync, writeFileSync, writeSync, ftruncateSync } from 'node:fs';
import * as path from 'node:path';
import { ErrorCodes, TmError } from '../../src/errors.js';
import type { LvmCommands } from '../../src/track/lvm.js';
import { toolEnv } from '../../src/track/thin-meta.js';

const PACKAGES: Record<string, string> = {
  thin_restore: 'thin-provisioning-tools',
  thin_dump: 'thin-provisioning-tools',
  thin_delta: 'thin-provisioning-tools',
  losetup: 'util-linux',
};

/** Throw (failing the test) unless every program is installed; the message says what to install. */
export function needTools(...names: string[]): void {
  const env = toolEnv();
  for (const n of names) {
    const found = (env.PATH ?? '').split(':').some((d) => d !== '' && existsSync(path.join(d, n)));
    if (!found) throw new Error(`${n} is not installed: install ${PACKAGES[n] ?? n} (apt-get install ${PACKAGES[n] ?? n}); this test needs it and does not skip`);
  }
}

/** One mapping of a thin device: thin block → data block. */
export type Mapping = Map<number, number>;

export interface ThinDeviceXml {
  devId: number;
  mappings: Mapping;
}

/**
 * Pool metadata as thin_dump's XML (the format thin_restore reads): runs of
 * consecutive thin blocks on consecutive data blocks become range_mapping.
 * `dataBlockSectors`: thin block size in 512-byte sectors.
 */
export function poolXml(dataBlockSectors: number, nrDataBlocks: number, devices: ThinDeviceXml[]): string {
  const lines = [`<superblock uuid="" time="1" transaction="${devices.length}" flags="0" version="2" data_block_size="${dataBlockSectors}" nr_data_blocks="${nrDataBlocks}">`];
  for (const d of devices) {
    const keys = [...d.mappings.keys()].sort((a, b) => a - b);
    lines.push(`  <device dev_id="${d.devId}" mapped_blocks="${keys.length}" transaction="0" creation_time="0" snap_time="1">`);
    for (let i = 0; i < keys.length; ) {
      const b = keys[i]!;
      const data = d.mappings.get(b)!;
      let n = 1;
      while (i + n < keys.length && keys[i + n] === b + n && d.mappings.get(b + n) === data + n) n++;
      if (n === 1) lines.push(`    <single_mapping origin_block="${b}" data_block="${data}" time="0"/>`);
      else lines.push(`    <range_mapping origin_begin="${b}" data_begin="${data}" length="${n}" time="0"/>`);
      i += n;
    }
    lines.push('  </device>');
  }
  lines.push('</superblock>');
  return lines.join('\n') + '\n';
}

const META_BLOCK = 4096;

/** Build a real pool metadata file from XML with thin_restore (16 MiB, sparse). */
export function restoreMetadata(xml: string, metaFile: string): void {
  needTools('thin_restore');
  const xmlFile = `${metaFile}.xml`;
  writeFileSync(xmlFile, xml);
  rmSync(metaFile, { force: true });
  const fd = openSync(metaFile, 'w');
  ftruncateSync(fd, 16 * 1024 * 1024);
  closeSync(fd);
  execFileSync('thin_restore', ['-i', xmlFile, '-o', metaFile], { env: toolEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
}

// crc32c (Castagnoli), as the kernel's persistent-data checksums use it.
const CRC_TABLE = new Uint32Array(256);
for (let i = 0; i < 256; i++) {
  let c = i;
  for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  CRC_TABLE[i] = c >>> 0;
}
/** dm_bm_checksum(data, len, xor) = crc32c(~0, data, len) ^ xor (no final inversion). */
function dmChecksum(data: Buffer, xor: number): number {
  let c = 0xffffffff;
  for (let i = 0; i < data.length; i++) c = (CRC_TABLE[(c ^ data[i]!) & 0xff]! ^ (c >>> 8)) >>> 0;
  return (c ^ xor) >>> 0;
}
/** SUPERBLOCK_CSUM_XOR in drivers/md/dm-thin-metadata.c. */
const SUPERBLOCK_CSUM_XOR = 160774;
/** Offsets in struct thin_disk_superblock. */
const SB_BLOCKNR = 8;
const SB_HELD_ROOT = 56;
const SB_SPACE_MAP_ROOTS = 64; // data and metadata space map roots, 2 × 128 bytes
const SB_SPACE_MAP_ROOTS_END = 320;

function readBlock(fd: number, block: number): Buffer {
  const b = Buffer.alloc(META_BLOCK);
  readSync(fd, b, 0, META_BLOCK, block * META_BLOCK);
  return b;
}

function writeSuperblock(fd: number, block: number, sb: Buffer): void {
  sb.writeUInt32LE(dmChecksum(sb.subarray(4), SUPERBLOCK_CSUM_XOR), 0);
  writeSync(fd, sb, 0, META_BLOCK, block * META_BLOCK);
}

/** The held metadata root of a metadata file's superblock, null when none (or no file). */
export function heldRootOf(metaFile: string): number | null {
  if (!existsSync(metaFile)) return null;
  const fd = openSync(metaFile, 'r');
  try {
    const held = Number(readBlock(fd, 0).readBigUInt64LE(SB_HELD_ROOT));
    return held === 0 ? null : held;
  } finally {
    closeSync(fd);
  }
}

/**
 * Take a metadata snapshot the way the kernel's reserve_metadata_snap does: copy
 * the superblock to an unused metadata block (its space map roots cleared, its
 * own location in `blocknr`), and record that block as `held_root` in the live
 * superblock. The unused block is the last all-zero block of the file
 * (thin_restore allocates from the start). Returns the held block.
 */
export function holdMetadataSnapshot(metaFile: string): number {
  const fd = openSync(metaFile, 'r+');
  try {
    const sb = readBlock(fd, 0);
    const stored = sb.readUInt32LE(0);
    if (dmChecksum(sb.subarray(4), SUPERBLOCK_CSUM_XOR) !== stored) throw new Error(`${metaFile}: superblock checksum does not verify: the emulation is wrong`);
    if (sb.readBigUInt64LE(SB_HELD_ROOT) !== 0n) throw new Error(`${metaFile}: a metadata snapshot is held already`);
    let block = 16 * 1024 * 1024 / META_BLOCK - 1;
    while (block > 0 && readBlock(fd, block).some((x) => x !== 0)) block--;
    if (block <= 0) throw new Error(`${metaFile}: no free metadata block`);
    const copy = Buffer.from(sb);
    copy.writeBigUInt64LE(BigInt(block), SB_BLOCKNR);
    copy.fill(0, SB_SPACE_MAP_ROOTS, SB_SPACE_MAP_ROOTS_END);
    writeSuperblock(fd, block, copy);
    sb.writeBigUInt64LE(BigInt(block), SB_HELD_ROOT);
    writeSuperblock(fd, 0, sb);
    return block;
  } finally {
    closeSync(fd);
  }
}

/** release_metadata_snap: clear `held_root` (and the copy). */
export function dropMetadataSnapshot(metaFile: string): void {
  const fd = openSync(metaFile, 'r+');
  try {
    const sb = readBlock(fd, 0);
    const held = Number(sb.readBigUInt64LE(SB_HELD_ROOT));
    if (held === 0) throw new Error(`${metaFile}: no metadata snapshot held`);
    writeSync(fd, Buffer.alloc(META_BLOCK), 0, META_BLOCK, held * META_BLOCK);
    sb.writeBigUInt64LE(0n, SB_HELD_ROOT);
    writeSuperblock(fd, 0, sb);
  } finally {
    closeSync(fd);
  }
}

/** Thrown by FakeLvm at a `crashAt` point: the test treats the source instance as killed. */
export class SimulatedCrash extends Error {
  constructor(point: string) {
    super(`simulated crash at ${point}`);
    this.name = 'SimulatedCrash';
  }
}

type Method = 'createThinSnapshot' | 'removeLv' | 'reserveMetadataSnap' | 'releaseMetadataSnap' | 'thinDeviceId' | 'activateLv';

interface FakeLv {
  devId: number;
  mappings: Mapping;
  file: string;
  readOnly: boolean;
}

/**
 * A TEST DOUBLE of LVM: one VG, one thin pool, one origin thin volume, thin
 * snapshots of it. Thin devices share data blocks the way dm-thin does: a write
 * to a block that is unmapped or shared with a snapshot maps a new data block
 * (copy-on-write); a write to a block the origin owns alone stays in place; a
 * discard unmaps. Devices are sparse files; snapshots are copies of the
 * origin's file. The metadata path is real (see the file comment).
 */
export class FakeLvm implements LvmCommands {
  readonly lvs = new Map<string, FakeLv>();
  readonly refs = new Map<number, number>();
  /** Every command, in order, as "method arg …" (for assertions on what ran). */
  readonly calls: string[] = [];
  readonly metaFile: string;
  private nextDevId = 1;
  private nextData = 0;
  /** Throw SimulatedCrash when this method is called (`after`: once it has done its work), once. */
  crashAt: { method: Method; after?: boolean } | null = null;

  constructor(
    readonly dir: string,
    readonly vg: string,
    readonly pool: string,
    readonly origin: string,
    readonly dataBlockSize: number,
    readonly size: number,
  ) {
    this.metaFile = path.join(dir, `${pool}_tmeta`);
    const file = path.join(dir, `${origin}.img`);
    const fd = openSync(file, 'w');
    ftruncateSync(fd, size);
    closeSync(fd);
    this.lvs.set(origin, { devId: this.nextDevId++, mappings: new Map(), file, readOnly: false });
  }

  private hook(method: Method, after: boolean): void {
    if (this.crashAt && this.crashAt.method === method && (this.crashAt.after ?? false) === after) {
      this.crashAt = null;
      throw new SimulatedCrash(`${method}${after ? ' (after)' : ''}`);
    }
  }

  private lv(vg: string, name: string): FakeLv {
    if (vg !== this.vg) throw new TmError(ErrorCodes.LVM, `Volume group "${vg}" not found`);
    const lv = this.lvs.get(name);
    if (!lv) throw new TmError(ErrorCodes.LVM, `Failed to find logical volume "${vg}/${name}"`);
    return lv;
  }

  private ref(block: number, delta: number): void {
    const n = (this.refs.get(block) ?? 0) + delta;
    if (n <= 0) this.refs.delete(block);
    else this.refs.set(block, n);
  }

  /** Write to the origin (as its user would): copy-on-write of shared blocks, data into its file. */
  write(offset: number, data: Buffer): void {
    const o = this.lvs.get(this.origin)!;
    if (o.readOnly) throw new Error('origin is read-only');
    const first = Math.floor(offset / this.dataBlockSize);
    const last = Math.floor((offset + data.length - 1) / this.dataBlockSize);
    for (let b = first; b <= last; b++) {
      const cur = o.mappings.get(b);
      if (cur === undefined || (this.refs.get(cur) ?? 0) > 1) {
        if (cur !== undefined) this.ref(cur, -1);
        const fresh = this.nextData++;
        o.mappings.set(b, fresh);
        this.ref(fresh, 1);
      }
    }
    const fd = openSync(o.file, 'r+');
    try {
      writeSync(fd, data, 0, data.length, offset);
    } finally {
      closeSync(fd);
    }
  }

  /** Discard whole thin blocks [first, first + count) of the origin: unmapped, read as zeros. */
  discard(firstBlock: number, count: number): void {
    const o = this.lvs.get(this.origin)!;
    for (let b = firstBlock; b < firstBlock + count; b++) {
      const cur = o.mappings.get(b);
      if (cur !== undefined) this.ref(cur, -1);
      o.mappings.delete(b);
    }
    const fd = openSync(o.file, 'r+');
    try {
      const len = Math.min(count * this.dataBlockSize, this.size - firstBlock * this.dataBlockSize);
      writeSync(fd, Buffer.alloc(len), 0, len, firstBlock * this.dataBlockSize);
    } finally {
      closeSync(fd);
    }
  }

  /** The pool's mappings as XML (what thin_dump of the live pool would print). */
  xml(): string {
    const devices = [...this.lvs.values()].sort((a, b) => a.devId - b.devId).map((l) => ({ devId: l.devId, mappings: l.mappings }));
    return poolXml(this.dataBlockSize / 512, Math.max(1024, this.nextData + 1), devices);
  }

  async createThinSnapshot(vg: string, lv: string, snap: string): Promise<void> {
    this.calls.push(`createThinSnapshot ${vg}/${lv} ${snap}`);
    this.hook('createThinSnapshot', false);
    const o = this.lv(vg, lv);
    if (this.lvs.has(snap)) throw new TmError(ErrorCodes.LVM, `Logical Volume "${snap}" already exists in volume group "${vg}"`);
    const file = path.join(this.dir, `${snap}.img`);
    copyFileSync(o.file, file);
    for (const d of o.mappings.values()) this.ref(d, 1);
    this.lvs.set(snap, { devId: this.nextDevId++, mappings: new Map(o.mappings), file, readOnly: true });
    this.hook('createThinSnapshot', true);
  }

  async activateLv(vg: string, name: string): Promise<void> {
    this.calls.push(`activateLv ${vg}/${name}`);
    this.hook('activateLv', false);
    this.lv(vg, name);
  }

  async removeLv(vg: string, name: string): Promise<void> {
    this.calls.push(`removeLv ${vg}/${name}`);
    this.hook('removeLv', false);
    const l = this.lv(vg, name);
    for (const d of l.mappings.values()) this.ref(d, -1);
    this.lvs.delete(name);
    rmSync(l.file, { force: true });
    this.hook('removeLv', true);
  }

  async listLvs(vg: string): Promise<string[]> {
    if (vg !== this.vg) throw new TmError(ErrorCodes.LVM, `Volume group "${vg}" not found`);
    return [this.pool, ...this.lvs.keys()];
  }

  async thinDeviceId(vg: string, lv: string): Promise<number> {
    this.hook('thinDeviceId', false);
    return this.lv(vg, lv).devId;
  }

  devicePath(vg: string, lv: string): string {
    return this.lv(vg, lv).file;
  }

  poolMetadataPath(vg: string, pool: string): string {
    if (vg !== this.vg || pool !== this.pool) throw new TmError(ErrorCodes.LVM, `no pool ${vg}/${pool}`);
    return this.metaFile;
  }

  async heldMetadataRoot(): Promise<number | null> {
    return heldRootOf(this.metaFile);
  }

  async reserveMetadataSnap(vg: string, pool: string): Promise<void> {
    this.calls.push(`reserveMetadataSnap ${vg}/${pool}`);
    this.hook('reserveMetadataSnap', false);
    if (heldRootOf(this.metaFile) !== null) {
      throw new TmError(ErrorCodes.LVM, `dmsetup message ${vg}-${pool}-tpool 0 reserve_metadata_snap failed (exit status 1); stderr: device-mapper: message ioctl on ${vg}-${pool}-tpool  failed: Device or resource busy`);
    }
    // The kernel commits the transaction before copying the superblock: the live metadata is current.
    restoreMetadata(this.xml(), this.metaFile);
    holdMetadataSnapshot(this.metaFile);
    this.hook('reserveMetadataSnap', true);
  }

  async releaseMetadataSnap(vg: string, pool: string): Promise<void> {
    this.calls.push(`releaseMetadataSnap ${vg}/${pool}`);
    this.hook('releaseMetadataSnap', false);
    if (heldRootOf(this.metaFile) === null) {
      throw new TmError(ErrorCodes.LVM, `dmsetup message ${vg}-${pool}-tpool 0 release_metadata_snap failed (exit status 1); stderr: device-mapper: message ioctl on ${vg}-${pool}-tpool  failed: Invalid argument`);
    }
    dropMetadataSnapshot(this.metaFile);
  }

  /** Snapshot names that exist, ascending by generation. */
  snapshotNames(): string[] {
    return [...this.lvs.keys()].filter((n) => n !== this.origin).sort();
  }
}
