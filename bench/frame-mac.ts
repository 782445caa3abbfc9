/**
 * Frame MAC case of `npm run bench` (issue 14 §2): what the per-frame
 * MAC costs. In the same run, on one CPU:
 *   1. the protocol's GMAC alone, as sessions compute it (auth.ts FrameMac, the
 *      addon) and by Node's createCipheriv per frame (frameTag), and
 *      HMAC-SHA256 over the same input (the MAC it replaced), over 4 KiB,
 *      1 MiB and 8 MiB frames: MB/s;
 *   2. data extents of 1 MiB (raw payload) sent from one Session to another over
 *      the in-memory link and decoded on the other side, without a MAC (no
 *      handshake) and with it (after the real handshake): frames/s and MB/s both
 *      ways, and the ratio. The link copies each frame once, as a socket would.
 * Repeated TM_BENCH_MAC_ROUNDS times (default 3), best round kept for each.
 *
 * Environment: TM_BENCH_MAC_FRAMES (frames per round, default 512).
 */
import { randomBytes } from 'node:crypto';
import * as os from 'node:os';
import { FrameMac, frameHmacForBench, frameTag, sessionKey } from '../src/wire/auth.js';
import { primaryHandshake, secondaryHandshake } from '../src/wire/handshake.js';
import { memorySessionPair } from '../src/wire/memory.js';
import type { ExtentMsg } from '../src/wire/messages.js';
import { crc32c } from '../src/wire/payload.js';
import type { Session } from '../src/wire/session.js';
import { writeResult } from './results.js';

const MiB = 1024 * 1024;
const KEY = Buffer.from('bench-frame-mac-pre-shared-key-0123456789');

const macs = new WeakMap<Buffer, FrameMac>();
/** The session's MAC object of `key` (made once per key, as a session does). */
function macOf(key: Buffer): FrameMac {
  let m = macs.get(key);
  if (!m) macs.set(key, (m = new FrameMac(key)));
  return m;
}

/** MB/s of `mac` over `size`-byte frames for about one second. */
function macRate(mac: typeof frameTag, size: number): number {
  const key = sessionKey(KEY, 'bench', randomBytes(32), randomBytes(32));
  const frame = randomBytes(size);
  let n = 0;
  const t0 = performance.now();
  while (performance.now() - t0 < 1000) mac(key, 'primary', n++, frame);
  return (n * size) / 1e6 / ((performance.now() - t0) / 1000);
}

async function pair(protect: boolean): Promise<{ a: Session; b: Session }> {
  const { a, b } = memorySessionPair({ maxQueued: 16 });
  const volumeSize = 1 << 30;
  const chunkSize = 65536;
  if (protect) {
    const sec = secondaryHandshake(b, { node: 'site-b', psk: KEY }).then(() => b.send({ type: 'ready', committedGeneration: 0, applying: null }));
    await primaryHandshake(a, { node: 'site-a', mirror: 'bench', psk: KEY, volumeSize, chunkSize, volumeId: 'ab' });
    await sec;
  } else {
    a.ctx.volumeSize = volumeSize;
    a.ctx.chunkSize = chunkSize;
  }
  b.ctx.volumeSize = volumeSize;
  b.ctx.chunkSize = chunkSize;
  return { a, b };
}

/** Seconds to send `frames` 1 MiB data extents from a to b and have b decode them, with at most 16 in flight. */
async function stream(protect: boolean, frames: number): Promise<number> {
  const { a, b } = await pair(protect);
  const payload = randomBytes(MiB);
  const crc = crc32c(payload);
  const t0 = performance.now();
  let received = 0;
  const reader = (async () => {
    while (received < frames) {
      const m = await b.next();
      if (m.type !== 'extent' || m.payload!.length !== MiB) throw new Error(`unexpected ${m.type}`);
      received++;
    }
  })();
  for (let i = 0; i < frames; i++) {
    const msg: ExtentMsg = { type: 'extent', seq: i + 1, kind: 'data', offset: (i % 1024) * MiB, length: MiB, codec: 'raw', crc32c: crc, payload };
    a.send(msg);
    // Bounded in flight, as the primary's flow control does.
    while (i + 1 - received > 16) await new Promise((r) => setImmediate(r));
  }
  await reader;
  const s = (performance.now() - t0) / 1000;
  a.close();
  b.close();
  return s;
}

export async function frameMacBench(): Promise<void> {
  const frames = Number(process.env.TM_BENCH_MAC_FRAMES ?? 512);
  const rounds = Number(process.env.TM_BENCH_MAC_ROUNDS ?? 3);
  console.log(`frame MAC: GMAC (the protocol's) and HMAC-SHA256 alone, then ${frames} data extents of 1 MiB over an in-memory session pair with and without the MAC, best of ${rounds}`);
  const sizes = { frame4KiB: 4096, frame1MiB: MiB, frame8MiB: 8 * MiB };
  const rates = (mac: typeof frameTag) => Object.fromEntries(Object.entries(sizes).map(([k, n]) => [k, Math.max(...Array.from({ length: rounds }, () => macRate(mac, n)))])) as Record<keyof typeof sizes, number>;
  const addon = rates((key, from, seq, frame) => macOf(key).tag(from, seq, frame));
  const gmac = rates(frameTag);
  const hmac = rates(frameHmacForBench);
  const best = { plain: Infinity, mac: Infinity };
  for (let r = 0; r < rounds; r++) {
    best.plain = Math.min(best.plain, await stream(false, frames));
    best.mac = Math.min(best.mac, await stream(true, frames));
  }
  const rate = (s: number) => ({ seconds: s, framesPerSecond: frames / s, MBps: (frames * MiB) / 1e6 / s });
  const result = {
    date: new Date().toISOString(),
    host: { cpus: os.cpus().length, model: os.cpus()[0]?.model, node: process.version, loadavg: os.loadavg() },
    gmacAddonMBps: addon,
    gmacNodeCryptoMBps: gmac,
    hmacSha256MBps: hmac,
    session1MiBExtents: { frames, withoutMac: rate(best.plain), withMac: rate(best.mac), slowdown: best.mac / best.plain },
    note: 'one process, one CPU for both ends of the in-memory link (each end computes its own tags): a real pair spends the MAC cost once per side. gmacAddonMBps is the protocol\'s MAC as sessions compute it (FrameMac: the addon, one key schedule per session); gmacNodeCryptoMBps the same tags by createCipheriv per frame; hmacSha256MBps the MAC it replaced, over the same input',
  };
  for (const [name, r] of [['GMAC, addon (sessions)  ', addon], ['GMAC, createCipheriv    ', gmac], ['HMAC-SHA256 (replaced)  ', hmac]] as const) {
    console.log(`  ${name}: ${r.frame4KiB.toFixed(0)} MB/s over 4 KiB frames, ${r.frame1MiB.toFixed(0)} MB/s over 1 MiB, ${r.frame8MiB.toFixed(0)} MB/s over 8 MiB`);
  }
  for (const k of ['withoutMac', 'withMac'] as const) {
    const x = result.session1MiBExtents[k];
    console.log(`  ${k === 'withMac' ? 'with MAC   ' : 'without MAC'}: ${x.framesPerSecond.toFixed(0).padStart(6)} frames/s  ${x.MBps.toFixed(0).padStart(6)} MB/s  (${frames} x 1 MiB in ${x.seconds.toFixed(2)} s)`);
  }
  console.log(`  with / without: ${result.session1MiBExtents.slowdown.toFixed(2)}x the time (machine loadavg ${os.loadavg()[0]!.toFixed(1)})`);
  console.log(`results: ${await writeResult('frame-mac', result)}`);
}
