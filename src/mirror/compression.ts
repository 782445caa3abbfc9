import type { CompressionMode } from './settings.js';

/**
 * Whether a primary compresses its data extents (issue 13 §1): `off` never,
 * `lz4` always tries, `auto` compresses only while that raises the rate at
 * which allocated data reaches the secondary.
 *
 * **What auto measures.** Whatever limits a mirror shows in one place: the
 * rate at which the secondary acknowledges data (allocated bytes, before
 * compression). Sending raw, that rate is what the link (and the secondary
 * behind it) accepts; compressing, it is what the compressor delivers through
 * the link: at most the compressor's own rate, and at most the link's rate
 * divided by the ratio. On loopback both daemons share the CPUs and the
 * "link" is as fast as memory, so raw wins; on a 1 Gbit/s link with 4:1 data
 * lz4 delivers up to four times the link rate. Measuring the outcome, not a
 * model of it, also counts what a model misses: the secondary's decompression,
 * the CPU both daemons share, a slow target.
 *
 * **How.** Data pieces are counted into windows of `windowBytes` (32 MiB),
 * each prepared under one choice. A window is measured at the acknowledgement
 * side: the bytes acknowledged after its first quarter (the pipeline filling
 * after a switch) over the time they took. Like zstd's `--adapt`, the choice
 * keeps to the better codec and looks at the other one now and then: both are
 * measured at the start (lz4 first, the safe choice on a slow link), then lz4
 * runs only while it delivers more (by `margin` to take over from raw, by
 * `holdMargin` to stay; a tie is raw: compression must pay for itself), and
 * every `probeEvery` windows one
 * window tries the other; a probe that loses doubles the interval (up to
 * `probeEveryMax`), one that wins takes over and resets it.
 *
 * **Data that does not compress.** A piece is sent lz4 only when its lz4 form
 * is at most `goodRatio` (7/8) of it; else raw (decompressing it would cost the
 * secondary more than the bytes saved). Under auto, the ratio of the pieces
 * tried is averaged, weighted by their bytes (a piece of `ratioBytes` moves
 * it a quarter of the way); once that average is above `goodRatio` the
 * attempts stop for `skipMin` pieces, then one piece probes; each probe that
 * leaves the average above doubles the pause (up to `skipMax`), one that
 * brings it back ends it. Weighting by bytes keeps a small piece that happens
 * to compress (a chunk half zeros at the edge of an extent) from restarting
 * the attempts on a stream of incompressible data.
 *
 * Deterministic: every measurement carries its time (ms, any monotonic clock),
 * so tests feed rates instead of waiting.
 */

export type Codec = 'raw' | 'lz4';

export interface CompressionTuning {
  /** Allocated bytes of data pieces per measurement window. */
  windowBytes: number;
  /** lz4 replaces raw when measured faster by this factor ... */
  margin: number;
  /** ... and stays while faster by this one (below: a tie, which is raw). */
  holdMargin: number;
  /** Windows between two probes of the codec not in use, at first and at most. */
  probeEvery: number;
  probeEveryMax: number;
  /** lz4 is kept for a piece only when its payload is at most this share of the raw bytes. */
  goodRatio: number;
  /** Bytes of tried pieces that move the average ratio a quarter of the way (from 0, about 7 of them above goodRatio stop auto trying) ... */
  ratioBytes: number;
  /** ... for this many pieces, doubled after each failed probe up to skipMax. */
  skipMin: number;
  skipMax: number;
}

export const DEFAULT_TUNING: CompressionTuning = {
  windowBytes: 32 * 1024 * 1024,
  margin: 1.1,
  holdMargin: 1.03,
  probeEvery: 4,
  probeEveryMax: 16,
  goodRatio: 7 / 8,
  ratioBytes: 1024 * 1024,
  skipMin: 8,
  skipMax: 512,
};

/** What status shows of a mirror's compression (primary only). */
export interface CompressionStatus {
  mode: CompressionMode;
  /** The codec data pieces are prepared with now (auto: the one chosen; `raw` also while pausing on data that does not compress). */
  codec: Codec;
  /** Why auto uses `codec` (null for lz4 and off). */
  reason: string | null;
  /** Data payload bytes on the wire / before compression, over this daemon's life; null before any data. */
  ratio: number | null;
  /** Of the pieces lz4 was tried on: lz4 bytes / raw bytes (how well the data compresses); null before any. */
  lz4Ratio: number | null;
  /** The last measured delivery rate with each codec, allocated bytes per second (auto); null when not measured. */
  rates: { raw: number | null; lz4: number | null };
  /** Data payload bytes before compression, and as sent. */
  payloadBytes: number;
  compressedPayloadBytes: number;
}

/** How one data piece is to be prepared: compress or not, and the window it counts in (null: not measured). */
export interface PieceTicket {
  compress: boolean;
  window: number | null;
}

interface Window {
  id: number;
  codec: Codec;
  /** Bytes of data pieces taken into it, and acknowledged so far. */
  taken: number;
  acked: number;
  /** Another window has opened after it: `taken` is final. */
  closed: boolean;
  /** Acknowledgements after the warm-up: first time, last time, bytes between. */
  t0: number | null;
  t1: number;
  measured: number;
  probe: boolean;
}

export class CompressionPolicy {
  private readonly t: CompressionTuning;
  private incumbent: Codec;
  private readonly rates: { raw: number | null; lz4: number | null } = { raw: null, lz4: null };
  private readonly windows = new Map<number, Window>();
  private current: Window | null = null;
  private nextId = 1;
  private sinceProbe = 0;
  private probeEvery: number;
  private reason: string;
  /** Average ratio of the pieces tried (weighted by bytes), pieces still to skip, and the next pause. */
  private avgRatio = 0;
  private skip = 0;
  /** Paused on data that does not compress: from a streak of failures until a piece compresses. */
  private paused = false;
  private skipLen: number;
  private payload = 0;
  private wirePayload = 0;
  private triedRaw = 0;
  private triedLz4 = 0;

  constructor(
    readonly mode: CompressionMode,
    tuning: Partial<CompressionTuning> = {},
  ) {
    this.t = { ...DEFAULT_TUNING, ...tuning };
    this.incumbent = mode === 'off' ? 'raw' : 'lz4';
    this.probeEvery = this.t.probeEvery;
    this.skipLen = this.t.skipMin;
    this.reason = 'measuring both codecs';
  }

  /** The share of a piece its lz4 form may take and still be sent (else raw). */
  get goodRatio(): number {
    return this.t.goodRatio;
  }

  /** The codec in use now. */
  get codec(): Codec {
    if (this.mode !== 'auto') return this.incumbent;
    const c = this.current?.codec ?? this.incumbent;
    return c === 'lz4' && this.paused ? 'raw' : c;
  }

  /**
   * A new generation starts: windows of the last one that were never fully
   * acknowledged are dropped (their pieces may be sent again), measured rates stay.
   */
  restart(): void {
    this.windows.clear();
    this.current = null;
  }


  /** How to prepare the next data piece of `bytes` (allocated bytes). Call once per piece, then {@link compressed} if it was compressed. */
  take(bytes: number): PieceTicket {
    if (this.mode === 'off') return { compress: false, window: null };
    if (this.mode === 'lz4') return { compress: true, window: null };
    let w = this.current;
    if (!w || w.taken >= this.t.windowBytes) w = this.open();
    w.taken += bytes;
    let compress = w.codec === 'lz4';
    if (compress && this.skip > 0) {
      this.skip--;
      compress = false;
    }
    return { compress, window: w.id };
  }

  /** A piece of `rawBytes` was compressed to `lz4Bytes`; returns whether lz4 is kept (else the piece goes raw). */
  compressed(rawBytes: number, lz4Bytes: number): boolean {
    this.triedRaw += rawBytes;
    this.triedLz4 += Math.min(lz4Bytes, rawBytes);
    const good = lz4Bytes > 0 && lz4Bytes <= rawBytes * this.t.goodRatio;
    const ratio = good ? lz4Bytes / rawBytes : 1;
    this.avgRatio += Math.min(1, rawBytes / (4 * this.t.ratioBytes)) * (ratio - this.avgRatio);
    if (this.mode !== 'auto') return good;
    if (this.avgRatio <= this.t.goodRatio) {
      this.paused = false;
      this.skipLen = this.t.skipMin;
    } else {
      // A pause; every probe after it that leaves the average above doubles the next.
      this.skip = this.skipLen;
      this.paused = true;
      this.skipLen = Math.min(this.skipLen * 2, this.t.skipMax);
    }
    return good;
  }

  /** A data payload went out: `rawBytes` of allocated data as `wireBytes` of payload. */
  sent(rawBytes: number, wireBytes: number): void {
    this.payload += rawBytes;
    this.wirePayload += wireBytes;
  }

  /** The secondary acknowledged a data piece of `bytes` from `window` at `now` (ms). */
  acked(window: number | null, bytes: number, now: number): void {
    if (window === null) return;
    const w = this.windows.get(window);
    if (!w) return;
    w.acked += bytes;
    if (w.t0 === null) {
      // The first quarter fills the pipeline after a switch: not counted.
      const warmup = (w.closed ? Math.min(w.taken, this.t.windowBytes) : this.t.windowBytes) / 4;
      if (w.acked >= warmup) w.t0 = now;
    } else {
      w.measured += bytes;
      w.t1 = now;
    }
    if (w.closed && w.acked >= w.taken) this.finish(w);
  }

  /** The generation was committed (everything acknowledged): its last window counts if long enough. */
  end(): void {
    const w = this.current;
    this.current = null;
    if (w) {
      w.closed = true;
      if (w.acked >= w.taken && w.taken >= this.t.windowBytes / 2) this.finish(w);
    }
    this.windows.clear();
  }

  status(): CompressionStatus {
    return {
      mode: this.mode,
      codec: this.codec,
      reason: this.mode !== 'auto' ? null : this.codec === 'raw' && this.paused ? 'the data does not compress (lz4 paused, probing now and then)' : this.reason,
      ratio: this.payload > 0 ? this.wirePayload / this.payload : null,
      lz4Ratio: this.triedRaw > 0 ? this.triedLz4 / this.triedRaw : null,
      rates: { ...this.rates },
      payloadBytes: this.payload,
      compressedPayloadBytes: this.wirePayload,
    };
  }

  private open(): Window {
    if (this.current) this.current.closed = true;
    if (this.current && this.current.acked >= this.current.taken) this.finish(this.current);
    const other: Codec = this.incumbent === 'lz4' ? 'raw' : 'lz4';
    const pending = (c: Codec) => [...this.windows.values()].some((w) => w.codec === c);
    let codec = this.incumbent;
    let probe = false;
    if (this.rates[codec] === null && !pending(codec)) {
      // The first window (or one never finished): measure the codec in use first.
    } else if (this.rates[other] === null) {
      // Not measured yet: try it once (again after a window that was never finished).
      if (!pending(other)) {
        codec = other;
        probe = true;
      }
    } else if (++this.sinceProbe >= this.probeEvery && !pending(other)) {
      codec = other;
      probe = true;
      this.sinceProbe = 0;
    }
    // A window that probes lz4 tries it at once, even while paused on data that did not compress.
    if (probe && codec === 'lz4') this.skip = 0;
    const w: Window = { id: this.nextId++, codec, taken: 0, acked: 0, closed: false, t0: null, t1: 0, measured: 0, probe };
    this.windows.set(w.id, w);
    this.current = w;
    return w;
  }

  /** A window is fully acknowledged: its rate, and the choice it leads to. */
  private finish(w: Window): void {
    this.windows.delete(w.id);
    if (w.t0 === null || w.measured <= 0 || w.t1 <= w.t0) return; // too little to tell
    const rate = (w.measured * 1000) / (w.t1 - w.t0);
    const old = this.rates[w.codec];
    // The codec in use is measured window after window: smooth it; a probe's one window stands alone.
    this.rates[w.codec] = old !== null && w.codec === this.incumbent ? (old + rate) / 2 : rate;
    const { raw, lz4 } = this.rates;
    if (raw === null || lz4 === null) return;
    const mb = (x: number) => `${(x / 1e6).toFixed(0)} MB/s`;
    const before = this.incumbent;
    // Compression must pay for itself: lz4 takes over only when measured faster
    // by the margin, and keeps going only while it stays faster (a tie is raw:
    // the same rate for less CPU on both sides).
    this.incumbent = lz4 > raw * (this.incumbent === 'lz4' ? this.t.holdMargin : this.t.margin) ? 'lz4' : 'raw';
    if (w.probe) {
      if (this.incumbent === w.codec && before !== w.codec) this.probeEvery = this.t.probeEvery;
      else if (this.incumbent !== w.codec) this.probeEvery = Math.min(this.probeEvery * 2, this.t.probeEveryMax);
    }
    this.reason =
      this.incumbent === 'lz4'
        ? `lz4 delivers more: lz4 ${mb(lz4)}, raw ${mb(raw)} of allocated data measured`
        : `raw delivers as much or more: lz4 ${mb(lz4)}, raw ${mb(raw)} of allocated data measured`;
  }
}
