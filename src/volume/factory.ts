import { ErrorCodes, TmError } from '../errors.js';
import type { NativeOps } from '../native/index.js';
import { MemoryVolume } from './memory.js';
import { SparseFileVolume } from './sparse-file.js';
import type { Volume } from './volume.js';

/** The scheme of volumes held in memory: `memory:NAME`. */
export const MEMORY_SCHEME = 'memory:';

export interface OpenVolumeOptions {
  readOnly?: boolean;
  /**
   * When nothing exists at the path: create a volume of this size (a sparse
   * file, or a registered memory volume). Ignored when the volume exists and
   * with `readOnly`.
   */
  create?: { size: number };
  /** The native operations for file backends (tests inject failing ones). */
  ops?: NativeOps;
}

/**
 * Open the volume a config names: the one place that picks the backend.
 *
 * - `memory:NAME`: a new handle on the MemoryVolume registered as NAME (its
 *   own closed and read-only flags, the same data). Not registered: with
 *   `create` (and not `readOnly`, as for files), a new all-hole volume of
 *   that size is registered as NAME; without, TM_ERR_VOLUME_IO naming it.
 * - anything else: a path, opened by {@link SparseFileVolume.open} (a regular
 *   file, created sparse with `create`, or a block device opened as a file).
 *
 * @throws TmError TM_ERR_VOLUME_IO when the volume cannot be opened or created.
 */
export async function openVolume(path: string, o: OpenVolumeOptions = {}): Promise<Volume> {
  if (path.startsWith(MEMORY_SCHEME)) {
    const name = path.slice(MEMORY_SCHEME.length);
    if (name === '') throw new TmError(ErrorCodes.VOLUME_IO, `opening volume ${path}: a memory volume needs a name (memory:NAME)`);
    let vol = MemoryVolume.lookup(name);
    if (!vol) {
      if (!o.create || o.readOnly) throw new TmError(ErrorCodes.VOLUME_IO, `opening volume ${path}: no memory volume named ${name} is registered`);
      vol = MemoryVolume.create(o.create.size, { path });
      MemoryVolume.register(name, vol);
    }
    return vol.handle({ path, readOnly: o.readOnly === true });
  }
  return SparseFileVolume.open(path, o);
}
