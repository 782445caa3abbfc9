import type { MemoryVolume } from '../../src/volume/memory.js';
import type { ByteRange, Volume, VolumeCapabilities } from '../../src/volume/volume.js';

/**
 * A Volume that hands every call to an inner MemoryVolume: test doubles
 * extend it and override only what they watch or hold back (writes, zeros, flushes).
 */
export class DelegatingVolume implements Volume {
  readonly kind = 'memory' as const;
  constructor(readonly inner: MemoryVolume) {}
  get path(): string {
    return this.inner.path;
  }
  get size(): number {
    return this.inner.size;
  }
  get capabilities(): VolumeCapabilities {
    return this.inner.capabilities;
  }
  allocated(alignTo?: number, within?: ByteRange): Promise<ByteRange[]> {
    return this.inner.allocated(alignTo, within);
  }
  read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    return this.inner.read(offset, length, into);
  }
  write(offset: number, data: Buffer): Promise<void> {
    return this.inner.write(offset, data);
  }
  zero(offset: number, length: number): Promise<void> {
    return this.inner.zero(offset, length);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
