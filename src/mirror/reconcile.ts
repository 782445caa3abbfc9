import { ErrorCodes, TmError } from '../errors.js';
import { RoaringBitmap32 } from '../track/bitmap-store.js';
import { chunkDigest, DIGEST_BYTES, ZERO_DIGEST } from '../volume/digest.js';
import type { Volume } from '../volume/volume.js';
import { walk } from '../volume/walk.js';
import { MAX_DIGEST_RANGE, MAX_EXTENT_BYTES } from '../wire/messages.js';
import type { Session } from '../wire/session.js';
import type { GenerationChanges } from './sender.js';
import type { ReconcileReport } from './status.js';


/**
 * Tracking state was lost: compare the digests of `view` (frozen as the next
 * generation) with the secondary's, window by window, and return the chunks
 * that differ (possibly none: the generation still commits, so the view
 * becomes the base). One window is requested ahead so that both sides read at
 * once. Chunks found equal are told to `recordSent` as if sent, so a scan
 * source learns their digests. Costs a read of the allocated data on both
 * sides and 16 bytes per chunk on the wire, never a copy of everything.
 */
export async function reconcileByDigests(
  session: Session,
  view: Volume,
  o: {
    chunkSize: number;
    report: ReconcileReport;
    recordSent: GenerationChanges['recordSent'];
    signal: AbortSignal;
    /** Seconds to wait for each digests answer (TM_ERR_TIMEOUT after); absent: no limit. */
    peerTimeout?: number;
    /** Bytes of the chunks of a bitmap (for the report). */
    bytesOf: (bitmap: RoaringBitmap32) => number;
  },
): Promise<{ bitmap: RoaringBitmap32; readBytes: number }> {
  const cs = o.chunkSize;
  const size = view.size;
  const alloc = await view.allocated(cs);
  const bitmap = new RoaringBitmap32();
  const windows: [number, number][] = [];
  for (let off = 0; off < size; off += MAX_DIGEST_RANGE) windows.push([off, Math.min(MAX_DIGEST_RANGE, size - off)]);
  const request = (i: number) => session.send({ type: 'digest-req', offset: windows[i]![0], length: windows[i]![1] });
  if (windows.length > 0) request(0);
  let readBytes = 0;
  const mine = Buffer.alloc(DIGEST_BYTES);
  for (let i = 0; i < windows.length; i++) {
    if (i + 1 < windows.length) request(i + 1);
    const [off, len] = windows[i]!;
    const m = await session.next(o.peerTimeout ? o.peerTimeout * 1000 : undefined);
    if (m.type !== 'digests' || m.offset !== off || m.length !== len) {
      throw new TmError(ErrorCodes.PROTOCOL, `expected the digests of ${off}+${len} from the secondary, got ${m.type}${m.type === 'digests' ? ` of ${m.offset}+${m.length}` : ''}`);
    }
    o.signal.throwIfAborted();
    const theirs = m.digests;
    const differs = (c: number) => mine.compare(theirs, (c - off / cs) * DIGEST_BYTES, (c - off / cs + 1) * DIGEST_BYTES) !== 0;
    for await (const w of walk(view, { from: off, to: off + len, window: MAX_EXTENT_BYTES, alloc, chunkSize: cs, signal: o.signal })) {
      if (w.data === null) {
        // Unallocated here: zeros without reading.
        ZERO_DIGEST.copy(mine);
        for (let c = w.offset / cs; c < Math.ceil((w.offset + w.length) / cs); c++) {
          if (differs(c)) bitmap.add(c);
          else o.recordSent(c, null);
        }
        continue;
      }
      readBytes += w.length;
      for (let at = 0; at < w.length; at += cs) {
        const chunk = w.data.subarray(at, Math.min(at + cs, w.length));
        const c = (w.offset + at) / cs;
        chunkDigest(chunk, mine, 0);
        if (differs(c)) bitmap.add(c);
        else o.recordSent(c, mine.equals(ZERO_DIGEST) ? null : chunk);
      }
    }
    o.report.doneBytes = off + len;
    o.report.differingBytes = o.bytesOf(bitmap);
  }
  return { bitmap, readBytes };
}
