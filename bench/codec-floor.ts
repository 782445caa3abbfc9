import * as os from 'node:os';
import { SparseFileVolume } from '../src/volume/sparse-file.js';
import { chunkDigest, DIGEST_BYTES } from '../src/volume/digest.js';
import { compressPayload, decompressPayload } from '../src/wire/payload.js';

/**
 * What the payload codec alone costs on this machine, one piece at a time on
 * one CPU: lz4 compression with CRC-32C (the primary's work per byte, without
 * reading, hashing or sending), lz4 decompression with CRC-32C (the
 * secondary's), and SHA-256 scan digests, over the allocated data of `source`
 * in 1 MiB pieces, read first so that no I/O is timed. A pipeline that meets
 * the wire target (<= `wireTarget` of allocated) must compress at least the share
 * `mustCompress` of the data and cannot finish sooner than that share of
 * (compress + decompress) / CPUs, which bounds its throughput whatever else
 * it does (reading, writing, hashing, the network all come on top).
 */
export async function codecFloor(source: string, wireTarget: number): Promise<{ bytes: number; compressSeconds: number; decompressSeconds: number; sha256Seconds: number; wireRatio: number; mustCompress: number; cpus: number; ceilingMBps: number }> {
  const v = await SparseFileVolume.open(source, { readOnly: true });
  const piece = 1 << 20;
  let bytes = 0;
  let wire = 0;
  let compressNs = 0n;
  let decompressNs = 0n;
  let shaNs = 0n;
  try {
    // The primary's and the secondary's own calls: compressPayload, decompressPayload, chunkDigest.
    const lz = Buffer.allocUnsafe(piece);
    const back = Buffer.allocUnsafe(piece);
    const digest = Buffer.allocUnsafe(DIGEST_BYTES);
    for (const r of await v.allocated(65536)) {
      for (let o = r.offset; o < r.offset + r.length; o += piece) {
        const raw = await v.read(o, Math.min(piece, r.offset + r.length - o));
        let t = process.hrtime.bigint();
        const { codec, payload, crc32c } = await compressPayload(raw, lz);
        compressNs += process.hrtime.bigint() - t;
        t = process.hrtime.bigint();
        const out = decompressPayload({ type: 'extent', seq: 1, kind: 'data', offset: o, length: raw.length, codec, crc32c, payload }, back);
        decompressNs += process.hrtime.bigint() - t;
        if (!out.equals(raw)) throw new Error(`lz4 round trip at ${o} gave other bytes`);
        t = process.hrtime.bigint();
        for (let c = 0; c < raw.length; c += 65536) chunkDigest(raw.subarray(c, c + 65536), digest, 0);
        shaNs += process.hrtime.bigint() - t;
        bytes += raw.length;
        wire += payload.length;
      }
    }
  } finally {
    await v.close();
  }
  const compressSeconds = Number(compressNs) / 1e9;
  const decompressSeconds = Number(decompressNs) / 1e9;
  const cpus = os.cpus().length;
  // Meeting the wire target needs at least this share of the data compressed (the rest may travel raw).
  const wireRatio = wire / bytes;
  const mustCompress = Math.min(1, (1 - wireTarget) / (1 - wireRatio));
  const ceilingMBps = bytes / 1e6 / ((mustCompress * (compressSeconds + decompressSeconds)) / cpus);
  return { bytes, compressSeconds, decompressSeconds, sha256Seconds: Number(shaNs) / 1e9, wireRatio, mustCompress, cpus, ceilingMBps };
}
