import * as path from 'node:path';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { readJsonFile, writeFileAtomic } from '../util/atomic.js';
import type { ByteRange, Volume } from '../volume/volume.js';
import { RoaringBitmap32 } from './bitmap-store.js';
import { checkLvmName, type LvmCommands } from './lvm.js';
import type { ChangeSource, Detection, DetectOptions } from './source.js';
import { blockRangesToBytes, blockRangesToChunks, thinDelta, thinDump } from './thin-meta.js';

/** The allocation map of a frozen view, computed when first asked for. */
export type AllocationMapProvider = () => Promise<ByteRange[]>;

export interface LvmThinOptions {
  /** Volume group of the mirrored thin volume and of its pool. */
  vg: string;
  /** The mirrored thin volume (config `volume: /dev/VG/LV`). */
  lv: string;
  /** Its thin pool, in the same VG (config `lvm: { pool: VG/POOL }`). */
  pool: string;
  chunkSize: number;
  /** Size of the thin volume in bytes. */
  volumeSize: number;
  /** The mirror's state directory (the source keeps `lvm-thin.json` there). */
  stateDir: string;
  lvm: LvmCommands;
  /**
   * Open a snapshot's block device read-only. `allocated` gives the snapshot's
   * mapped ranges from the pool metadata (thin_dump), for Volume.allocated().
   */
  openView: (devicePath: string, allocated: AllocationMapProvider) => Promise<Volume>;
}

/** `lvm-thin.json`: small, rewritten atomically. */
interface LvmThinState {
  version: 1;
  vg: string;
  lv: string;
  pool: string;
  /** Generations whose snapshot this source created and has not removed (informational: LVM is asked). */
  snapshots: number[];
  /**
   * Set (durably) before `reserve_metadata_snap`, cleared after
   * `release_metadata_snap`: a metadata snapshot the pool holds while this is
   * set was taken by this source (then it crashed) and is released; one held
   * while it is clear belongs to somebody else and is left alone.
   */
  metadataSnapReserved: boolean;
  /** reset() was called: detections are full until the one for `fullGeneration` is recorded. */
  forceAll: boolean;
  /** The generation whose detection was made full because of `forceAll`. */
  fullGeneration: number | null;
}

const STATE_FILE = 'lvm-thin.json';

/**
 * One metadata snapshot per pool: sources of several mirrors in the same pool
 * (and the allocation maps of their views) take turns through this lock, keyed
 * by VG/POOL. Two daemons sharing a pool are not supported (docs/lvm-thin.md).
 */
const poolLocks = new Map<string, Promise<unknown>>();

async function withPoolLock<T>(key: string, fn: () => Promise<T>): Promise<T> {
  const prev = poolLocks.get(key) ?? Promise.resolve();
  const run = prev.then(fn, fn);
  const tail = run.catch(() => undefined);
  poolLocks.set(key, tail);
  try {
    return await run;
  } finally {
    if (poolLocks.get(key) === tail) poolLocks.delete(key);
  }
}

/**
 * `tracking.mode: lvm-thin`: each generation N is a read-only thin snapshot
 * `<lv>_tm_gen<N>` of the volume, taken by detect(N). The chunks of N are the
 * thin blocks whose mapping differs between the snapshots of N-1 and N,
 * according to `thin_delta` run on the pool's metadata snapshot; data is read
 * from snapshot N's device. Costs metadata reads only (readBytes = 0).
 *
 * Why comparing two snapshots finds every change: right after snapshot N-1 is
 * taken, every mapped block of the origin is shared with it, so any write to
 * the origin breaks the sharing and maps a new data block (and a discard
 * unmaps one); snapshot N inherits the origin's mappings, so each such block
 * is `different`, `right_only` or `left_only` between N-1 and N. Snapshots are
 * read-only (`lvcreate -pr`), so they never change after they are taken.
 *
 * Which snapshots exist: those of generations from the committed one (the
 * secondary holds it: the base after a restart) up to the last one recorded
 * (each must stay readable until committed; N-1 is the base of detect(N)).
 * Names are deterministic, so a restarted daemon finds them by listing the VG;
 * the state file only carries flags.
 *
 * Crash safety (kill -9 at any point), step by step:
 * - detect(N) before the primary recorded bitmap N: at restart the primary
 *   calls detect(N) again. A snapshot N (complete, half-activated, or absent)
 *   is removed and taken anew, so the comparison covers every write since
 *   N-1: nothing lost. Snapshots above N cannot belong to a recorded
 *   generation either and are removed too.
 * - Between `reserve_metadata_snap` and `release_metadata_snap` (or during
 *   thin_delta, which only reads): the pool keeps holding the metadata
 *   snapshot (the kernel answers a second reserve with EBUSY). The state file
 *   said `metadataSnapReserved` before the reserve, so the next detect (and
 *   open) release it first, then take a fresh one: a held snapshot predates
 *   snapshot N and must not be read for it.
 * - committed(N) removing old snapshots: removal is idempotent and open()
 *   removes whatever is below the committed generation, whether or not the
 *   state file caught up.
 * - The state file lost or stale: open() asks LVM which `<lv>_tm_gen<K>`
 *   exist and keeps those of generations the primary still needs; a needed
 *   snapshot that is missing (removed by hand) makes that detection full
 *   (`baseLost`), never a silent partial one.
 */
export class LvmThinSource implements ChangeSource {
  readonly mode = 'lvm-thin';
  private readonly file: string;
  private state: LvmThinState;
  /** Generations whose snapshot exists (as far as this source knows, checked against LVM at open). */
  private readonly snapshots = new Set<number>();
  private readonly views = new Map<number, Volume>();
  private readonly poolKey: string;

  constructor(private readonly o: LvmThinOptions) {
    checkLvmName(o.vg, 'volume group');
    checkLvmName(o.lv, 'logical volume');
    checkLvmName(o.pool, 'thin pool');
    checkLvmName(this.snapshotName(Number.MAX_SAFE_INTEGER), 'snapshot name');
    if (!Number.isSafeInteger(o.chunkSize) || o.chunkSize <= 0) throw new TmError(ErrorCodes.INTERNAL, `invalid chunk size ${o.chunkSize}`);
    if (!Number.isSafeInteger(o.volumeSize) || o.volumeSize < 0) throw new TmError(ErrorCodes.INTERNAL, `invalid volume size ${o.volumeSize}`);
    this.file = path.join(o.stateDir, STATE_FILE);
    this.poolKey = `${o.vg}/${o.pool}`;
    this.state = { version: 1, vg: o.vg, lv: o.lv, pool: o.pool, snapshots: [], metadataSnapReserved: false, forceAll: false, fullGeneration: null };
  }

  get chunkCount(): number {
    return Math.ceil(this.o.volumeSize / this.o.chunkSize);
  }

  /** The snapshot of generation `generation`: `<lv>_tm_gen<N>`. */
  snapshotName(generation: number): string {
    return `${this.o.lv}_tm_gen${generation}`;
  }

  private generationOf(name: string): number | null {
    const prefix = `${this.o.lv}_tm_gen`;
    if (!name.startsWith(prefix)) return null;
    const rest = name.slice(prefix.length);
    return /^(0|[1-9]\d*)$/.test(rest) && Number.isSafeInteger(Number(rest)) ? Number(rest) : null;
  }

  private async saveState(): Promise<void> {
    this.state.snapshots = [...this.snapshots].sort((a, b) => a - b);
    await writeFileAtomic(this.file, JSON.stringify(this.state, null, 2) + '\n');
  }

  /** Generations that have a `<lv>_tm_gen<K>` in the VG now, ascending. */
  private async existingSnapshots(): Promise<number[]> {
    const names = await this.o.lvm.listLvs(this.o.vg);
    return names
      .map((n) => this.generationOf(n))
      .filter((g): g is number => g !== null)
      .sort((a, b) => a - b);
  }

  async open(generation: number, committedGeneration: number): Promise<void> {
    const saved = await readJsonFile<LvmThinState>(this.file);
    if (saved !== undefined) {
      if (saved.version !== 1 || typeof saved.metadataSnapReserved !== 'boolean' || !Array.isArray(saved.snapshots)) {
        throw new TmError(ErrorCodes.STATE, `${this.file}: not an lvm-thin state file this version understands`);
      }
      if (saved.vg !== this.o.vg || saved.lv !== this.o.lv || saved.pool !== this.o.pool) {
        throw new TmError(
          ErrorCodes.STATE,
          `${this.file} belongs to ${saved.vg}/${saved.lv} in pool ${saved.pool}, not ${this.o.vg}/${this.o.lv} in pool ${this.o.pool}; ` +
            `remove its snapshots (${saved.lv}_tm_gen*) and the file to start over`,
        );
      }
      this.state = { ...saved, forceAll: saved.forceAll === true, fullGeneration: typeof saved.fullGeneration === 'number' ? saved.fullGeneration : null };
    }
    await withPoolLock(this.poolKey, async () => {
      await this.releaseLeftoverMetadataSnap();
      // Keep [committed, generation]: the committed base and every recorded,
      // uncommitted generation (their views are read until committed).
      this.snapshots.clear();
      for (const g of await this.existingSnapshots()) {
        if (generation > 0 && g >= committedGeneration && g <= generation) this.snapshots.add(g);
        else await this.o.lvm.removeLv(this.o.vg, this.snapshotName(g));
      }
      await this.saveState();
    });
  }

  /**
   * A metadata snapshot the pool holds when this source is about to take one:
   * released when this source took it (state flag), else refused with what to
   * do (it may be another tool's, reading the pool right now).
   */
  private async releaseLeftoverMetadataSnap(): Promise<void> {
    const { vg, pool, lvm } = this.o;
    const held = await lvm.heldMetadataRoot(vg, pool);
    if (held !== null) {
      if (!this.state.metadataSnapReserved) {
        throw new TmError(
          ErrorCodes.LVM,
          `thin pool ${vg}/${pool} holds a metadata snapshot (block ${held}) that thinmirror did not take; when no other tool is using it, ` +
            `release it with \`dmsetup message ${vg}-${pool}-tpool 0 release_metadata_snap\``,
        );
      }
      await lvm.releaseMetadataSnap(vg, pool);
    }
    if (this.state.metadataSnapReserved) {
      this.state.metadataSnapReserved = false;
      await this.saveState();
    }
  }

  /** Run `fn` with the pool's metadata snapshot held; always released after. */
  private async withMetadataSnap<T>(fn: (metadataPath: string) => Promise<T>): Promise<T> {
    const { vg, pool, lvm } = this.o;
    await this.releaseLeftoverMetadataSnap();
    // Durable before the reserve: a crash from here on leaves a flag that says "ours".
    this.state.metadataSnapReserved = true;
    await this.saveState();
    await lvm.reserveMetadataSnap(vg, pool);
    let result: T;
    try {
      result = await fn(lvm.poolMetadataPath(vg, pool));
    } finally {
      await lvm.releaseMetadataSnap(vg, pool);
      this.state.metadataSnapReserved = false;
      await this.saveState();
    }
    return result;
  }

  private allChunks(): RoaringBitmap32 {
    const b = new RoaringBitmap32();
    if (this.chunkCount > 0) b.addRange(0, this.chunkCount);
    return b;
  }

  private async closeView(generation: number): Promise<void> {
    const v = this.views.get(generation);
    if (!v) return;
    this.views.delete(generation);
    await v.close();
  }

  async detect(generation: number, opts: DetectOptions = {}): Promise<Detection> {
    if (!Number.isSafeInteger(generation) || generation < 1) throw new TmError(ErrorCodes.INTERNAL, `lvm-thin: invalid generation ${generation}`);
    const { vg, lv, lvm } = this.o;
    return withPoolLock(this.poolKey, async () => {
      opts.signal?.throwIfAborted();
      // No metadata snapshot may be held while LVs are created or removed.
      await this.releaseLeftoverMetadataSnap();
      // Snapshots of generation >= N come from detections that were never
      // recorded (else the primary would not ask for N): replace them.
      for (const g of await this.existingSnapshots()) {
        if (g < generation) continue;
        await this.closeView(g);
        await lvm.removeLv(vg, this.snapshotName(g));
        this.snapshots.delete(g);
      }
      opts.signal?.throwIfAborted();
      await lvm.createThinSnapshot(vg, lv, this.snapshotName(generation));
      this.snapshots.add(generation);
      await this.saveState();

      let full = opts.all === true;
      if (this.state.forceAll) {
        if (this.state.fullGeneration !== null && generation > this.state.fullGeneration) {
          // The full detection was recorded (the primary moved past it).
          this.state.forceAll = false;
          this.state.fullGeneration = null;
        } else {
          full = true;
          this.state.fullGeneration = generation;
        }
        await this.saveState();
      }
      const base = generation - 1;
      if (full || !this.snapshots.has(base)) {
        // Nothing to compare with: every chunk. `baseLost` unless the caller asked for it.
        return { bitmap: this.allChunks(), readBytes: 0, ...(opts.all ? {} : { baseLost: true }) };
      }
      const baseId = await lvm.thinDeviceId(vg, this.snapshotName(base));
      const newId = await lvm.thinDeviceId(vg, this.snapshotName(generation));
      const delta = await this.withMetadataSnap((meta) => thinDelta(meta, baseId, newId, { metadataSnap: true, signal: opts.signal }));
      return { bitmap: blockRangesToChunks(delta.changed, delta.dataBlockSize, this.o.chunkSize, this.chunkCount), readBytes: 0 };
    });
  }

  async view(generation: number): Promise<Volume> {
    const cached = this.views.get(generation);
    if (cached) return cached;
    const { vg, lvm } = this.o;
    const name = this.snapshotName(generation);
    if (!this.snapshots.has(generation)) {
      throw new TmError(ErrorCodes.LVM, `snapshot ${vg}/${name} of generation ${generation} does not exist (removed by hand?): reset the mirror's tracking`);
    }
    await lvm.activateLv(vg, name);
    let map: ByteRange[] | undefined;
    const allocated: AllocationMapProvider = async () => {
      if (map) return map;
      const id = await lvm.thinDeviceId(vg, name);
      const dump = await withPoolLock(this.poolKey, () => this.withMetadataSnap((meta) => thinDump(meta, id, { metadataSnap: true })));
      map = blockRangesToBytes(dump.mapped, dump.dataBlockSize, this.o.volumeSize);
      return map;
    };
    let v: Volume;
    try {
      v = await this.o.openView(lvm.devicePath(vg, name), allocated);
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `opening snapshot ${vg}/${name}`);
    }
    if (v.size < this.o.volumeSize) {
      await v.close();
      throw new TmError(ErrorCodes.SIZE_MISMATCH, `snapshot ${vg}/${name} holds ${v.size} bytes, the volume ${this.o.volumeSize}`);
    }
    // Another call may have opened it meanwhile: keep one.
    const again = this.views.get(generation);
    if (again) {
      await v.close();
      return again;
    }
    this.views.set(generation, v);
    return v;
  }

  async committed(generation: number): Promise<void> {
    await withPoolLock(this.poolKey, async () => {
      for (const g of [...this.snapshots].sort((a, b) => a - b)) {
        if (g >= generation) break;
        await this.closeView(g);
        await this.o.lvm.removeLv(this.o.vg, this.snapshotName(g));
        this.snapshots.delete(g);
      }
      await this.saveState();
    });
  }

  recordSent(): void {
    // Metadata source: what was sent teaches it nothing.
  }

  async persist(): Promise<void> {
    await this.saveState();
  }

  async reset(): Promise<void> {
    this.state.forceAll = true;
    this.state.fullGeneration = null;
    await this.saveState();
  }

  async close(): Promise<void> {
    for (const g of [...this.views.keys()]) await this.closeView(g);
  }
}
