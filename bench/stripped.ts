/**
 * The stripped pipeline of the link bench (bench/link.ts): the transport's
 * ceiling, built from thinmirror's own parts without its protocol. Two
 * processes, like the daemons:
 *
 *   node --import tsx bench/stripped.ts receive HOST PORT TARGET SIZE [checks]
 *   node --import tsx bench/stripped.ts send ws://HOST:PORT SOURCE [checks]
 *
 * The sender reads the allocated pieces of SOURCE (Volume.allocated at 64 KiB,
 * then Volume.read in pieces of at most 1 MiB) and sends each as one binary ws
 * frame (8-byte offset, then the bytes; zero mask, so ws skips masking) with
 * at most 16 frames unacknowledged. The receiver writes each frame at its
 * offset with SparseFileVolume.write, as they come (16 at most, as the
 * secondary's Receiver), acknowledges it once written, and flushes with the
 * secondary's cadence: one flush at a time every 64 MiB or 5 s written
 * (checkpointBytes, checkpointInterval in src/daemon/config.ts), then a final
 * flush before it answers the sender's end. No codec, no checksum, no digest,
 * no state file.
 *
 * With a last argument `checks` (both sides), it also does the per-byte work
 * thinmirror's design asks for, with thinmirror's own native parts, and
 * nothing else of thinmirror: the sender digests each piece's 64 KiB chunks
 * (SHA-256 on the threadpool, `chunkDigests`, kept in a table as scan
 * tracking keeps them), appends the CRC-32C of the piece and a GMAC tag of
 * the frame; the receiver verifies the tag and the CRC-32C before the write.
 * It is the ceiling of thinmirror / stripped on the machine it runs on
 * (bench/link.ts prints it): any implementation of the design pays at least
 * this, unless it beats the stripped pipeline at the rest.
 *
 * The receiver prints `listening` once it accepts connections; both print one
 * JSON line of their figures at the end (the sender's `seconds` runs from its
 * connect to the receiver's answer after the final flush, module loading
 * excluded).
 */
import { WebSocket, WebSocketServer, type RawData } from 'ws';
import { SparseFileVolume } from '../src/volume/sparse-file.js';
import { Coalesced } from '../src/util/coalesce.js';
import { native } from '../src/native/index.js';
import { chunkDigests } from '../src/volume/digest.js';
import { crc32c } from '../src/wire/payload.js';

const PIECE = 1 << 20;
const IN_FLIGHT = 16;
const CHECKPOINT_BYTES = 64 * 1024 * 1024;
const CHECKPOINT_SECONDS = 5;
/** `checks`: the chunk size digested, the CRC-32C and tag bytes a frame ends with, and the GMAC key both sides use. */
const CHUNK = 65536;
const CHECK_BYTES = 4 + 16;
const KEY = Buffer.alloc(32, 7);

function figures(extra: Record<string, unknown>): string {
  const cpu = process.cpuUsage();
  return JSON.stringify({ ...extra, cpuSeconds: (cpu.user + cpu.system) / 1e6, maxRssBytes: process.resourceUsage().maxRSS * 1024 });
}

async function receive(host: string, port: number, target: string, size: number, checks: boolean): Promise<void> {
  const key = checks ? native().gmacKey(KEY) : null;
  let seq = 0;
  const v = await SparseFileVolume.open(target, { create: { size } });
  let since = 0;
  let lastAt = Date.now();
  let written = 0;
  let writing = 0;
  let drained: (() => void) | null = null;
  const checkpoint = new Coalesced(() => v.flush());
  const wss = new WebSocketServer({ host, port, perMessageDeflate: false, maxPayload: 2 * PIECE });
  await new Promise<void>((resolve) => wss.once('listening', resolve));
  console.log('listening');
  const done = new Promise<void>((resolve, reject) => {
    wss.on('connection', (ws) => {
      ws.on('error', reject);
      ws.on('message', (data: RawData, isBinary: boolean) => {
        if (!isBinary) {
          // The sender's end: every write done, one last flush, then the answer.
          void (async () => {
            if (writing > 0) await new Promise<void>((r) => (drained = r));
            await checkpoint.settled();
            await v.flush();
            ws.send('done', () => resolve());
          })().catch(reject);
          return;
        }
        const buf = data as Buffer;
        const offset = buf.readUIntBE(0, 6);
        let payload = buf.subarray(8);
        if (key) {
          const n = buf.length;
          if (!native().gmacVerify(key, 0, seq++, buf.subarray(0, n - 16), buf.subarray(n - 16))) return reject(new Error(`frame at ${offset}: the GMAC does not verify`));
          payload = buf.subarray(8, n - CHECK_BYTES);
          if (crc32c(payload) !== buf.readUInt32LE(n - CHECK_BYTES)) return reject(new Error(`frame at ${offset}: the CRC-32C does not match`));
        }
        writing++;
        v.write(offset, payload).then(() => {
          writing--;
          written += payload.length;
          since += payload.length;
          if (!checkpoint.busy && (since >= CHECKPOINT_BYTES || Date.now() - lastAt >= CHECKPOINT_SECONDS * 1000)) {
            since = 0;
            lastAt = Date.now();
            checkpoint.request();
          }
          ws.send(buf.subarray(0, 8));
          if (writing === 0 && drained) drained();
        }, reject);
      });
    });
  });
  try {
    await done;
  } finally {
    wss.close();
    await v.close();
  }
  console.log(figures({ side: 'receiver', writtenBytes: written }));
}

async function send(url: string, source: string, checks: boolean): Promise<void> {
  const v = await SparseFileVolume.open(source, { readOnly: true });
  const key = checks ? native().gmacKey(KEY) : null;
  const digests = checks ? Buffer.alloc(Math.ceil(v.size / CHUNK) * 16) : null;
  let seq = 0;
  const t0 = performance.now();
  const ws = new WebSocket(url, { perMessageDeflate: false, generateMask: (mask: Buffer) => void mask.fill(0) });
  await new Promise<void>((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  let unacked = 0;
  let wake: (() => void) | null = null;
  let finished: (() => void) | null = null;
  ws.on('message', (data: RawData, isBinary: boolean) => {
    if (!isBinary) return finished?.();
    unacked--;
    const w = wake;
    wake = null;
    w?.();
  });
  // Frames are reused once ws has handed them to the socket (its send callback).
  const free: Buffer[] = [];
  let bytes = 0;
  let frames = 0;
  for (const r of await v.allocated(65536)) {
    for (let o = r.offset; o < r.offset + r.length; o += PIECE) {
      const len = Math.min(PIECE, r.offset + r.length - o);
      while (unacked >= IN_FLIGHT) await new Promise<void>((resolve) => (wake = resolve));
      const frame = free.pop() ?? Buffer.allocUnsafe(8 + PIECE + CHECK_BYTES);
      frame.writeUIntBE(o, 0, 6);
      frame.writeUInt16BE(0, 6);
      const payload = frame.subarray(8, 8 + len);
      await v.read(o, len, payload);
      let n = 8 + len;
      if (key && digests) {
        (await chunkDigests(payload, CHUNK)).copy(digests, (o / CHUNK) * 16);
        frame.writeUInt32LE(crc32c(payload), n);
        native().gmacTag(key, 0, seq++, frame.subarray(0, n + 4)).copy(frame, n + 4);
        n += CHECK_BYTES;
      }
      unacked++;
      ws.send(frame.subarray(0, n), { binary: true }, () => free.push(frame));
      bytes += len;
      frames++;
    }
  }
  while (unacked > 0) await new Promise<void>((resolve) => (wake = resolve));
  await new Promise<void>((resolve) => {
    finished = resolve;
    ws.send('end');
  });
  const seconds = (performance.now() - t0) / 1000;
  ws.close();
  await v.close();
  console.log(figures({ side: 'sender', seconds, bytes, frames }));
}

const [mode, ...args] = process.argv.slice(2);
(mode === 'receive' ? receive(args[0]!, Number(args[1]), args[2]!, Number(args[3]), args[4] === 'checks') : mode === 'send' ? send(args[0]!, args[1]!, args[2] === 'checks') : Promise.reject(new Error(`usage: stripped.ts receive HOST PORT TARGET SIZE [checks] | send URL SOURCE [checks]`))).then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(e);
    process.exit(1);
  },
);
