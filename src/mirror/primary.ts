import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import type { Logger } from 'pino';
import { WebSocket } from 'ws';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { readTlsFiles, type MirrorConfig, type TlsMaterial } from '../daemon/config.js';
import { BitmapStore, bitmapRuns, RoaringBitmap32 } from '../track/bitmap-store.js';
import { createSource } from '../track/index.js';
import type { ChangeSource } from '../track/source.js';
import { sleep } from '../util/sleep.js';
import { compressPayload } from '../wire/codec.js';
import { primaryHandshake } from '../wire/handshake.js';
import { DIGEST_BYTES, MAX_DIGEST_RANGE, MAX_EXTENT_BYTES, type ExtentMsg } from '../wire/messages.js';
import { chunkDigest } from '../track/scan.js';
import { Session } from '../wire/session.js';
import { connectError, refusalOf } from '../wire/tls.js';
import { SparseFileVolume } from '../volume/sparse-file.js';
import { totalBytes, type ByteRange, type Volume } from '../volume/volume.js';
import { isAllZero } from '../volume/zero.js';
import { FlowControl } from './flow.js';
import { ReadRing } from './read-ring.js';
import { StateFile, STATE_FORMAT, type PrimaryState } from './state.js';
import type { CycleReport, MirrorStatus, PrimaryPhase, ReconcileReport } from './status.js';

const ZERO16 = Buffer.alloc(DIGEST_BYTES);

/** Read requests prepared ahead of the socket (operations in flight on the read side). */
const READ_AHEAD = 32;
/** ... and at most this many bytes of them (scattered small pieces: many reads in flight; 1 MiB pieces: 4). */
const READ_AHEAD_BYTES = 4 * 1024 * 1024;
/** Codes after which retrying soon cannot help: back off to the maximum at once. */
const REFUSALS = new Set<string>([
  ErrorCodes.AUTH_FAILED,
  ErrorCodes.VERSION_MISMATCH,
  ErrorCodes.UNKNOWN_MIRROR,
  ErrorCodes.SIZE_MISMATCH,
  ErrorCodes.CHUNK_SIZE_MISMATCH,
  ErrorCodes.IDENTITY_MISMATCH,
  ErrorCodes.TLS,
]);

type Segment = { hole: boolean; offset: number; length: number };
type Prepared = Omit<ExtentMsg, 'seq'>;

/** Everything needed to run a primary mirror besides its config entry. */
export interface PrimaryContext {
  nodeName: string;
  stateDir: string;
  psk: Buffer;
  log: Logger;
  /**
   * Bandwidth cap (the mirror's and its peer's token buckets): resolves when
   * `bytes` more may go on the wire. Absent: unlimited.
   */
  throttle?: (bytes: number, signal: AbortSignal) => Promise<void>;
}

/** Frame bytes besides the payload, counted against a bandwidth cap (an estimate: msgpack keys and ws header). */
const FRAME_OVERHEAD = 96;

/**
 * The sending side of one mirror: keeps the secondary current by generations.
 * Generation 1 is every chunk of the volume (the initial sync: allocated chunks
 * as data or zeros, holes as trims); later generations are what the change
 * source detects. A generation's bitmap is on disk before any of its data is
 * sent and is removed only after the secondary's `committed`; after any
 * interruption the generation is resent from the secondary's durable cursor.
 */
export class PrimaryMirror {
  private readonly stateFile: StateFile<PrimaryState>;
  private readonly bitmaps: BitmapStore;
  private readonly log: Logger;
  private volume!: SparseFileVolume;
  private source!: ChangeSource;
  private state!: PrimaryState;
  private phase: PrimaryPhase = 'connecting';
  private lastError: TmError | null = null;
  private session: Session | null = null;
  private readonly abort = new AbortController();
  private loopDone: Promise<void> = Promise.resolve();
  private sentBytes = 0;
  private wireBytesBase = 0;
  private allocatedBytes = 0;
  private progress: { generation: number; doneBytes: number; totalBytes: number } | null = null;
  private lastCycle: CycleReport | null = null;
  private cycle: { generation: number; started: number; readBytes: number; changedBytes: number; wireAtStart: number } | null = null;
  private lastDetectAt = 0;
  private reconcileReport: ReconcileReport | null = null;
  private sessions = 0;
  private connectedSince: Date | null = null;
  /** A wss:// peer: read at start. */
  private tls: TlsMaterial | null = null;

  constructor(
    readonly config: MirrorConfig,
    private readonly ctx: PrimaryContext,
  ) {
    const dir = path.join(ctx.stateDir, config.name);
    this.stateFile = new StateFile(dir);
    this.bitmaps = new BitmapStore(dir);
    this.log = ctx.log;
  }

  get name(): string {
    return this.config.name;
  }

  /** Open the volume and state, then replicate in the background until {@link stop}. */
  async start(): Promise<void> {
    // A wss:// peer: our client certificate and key, and the CA that verifies the secondary (TM_ERR_CONFIG when unreadable).
    const files = this.config.tls;
    if (files) this.tls = await readTlsFiles(files, files.origin === 'node' ? 'tls' : `mirror ${this.name}: tls`, { log: this.log, refusedBy: 'the secondary' });
    await this.stateFile.init();
    this.volume = await SparseFileVolume.open(this.config.volume, { readOnly: true });
    try {
      await this.load();
    } catch (e) {
      await this.volume.close();
      throw e;
    }
    this.loopDone = this.run();
  }

  private async load(): Promise<void> {
    const c = this.config;
    let s = await this.stateFile.load('primary');
    if (s && s.chunkSize !== c.chunkSize) {
      throw new TmError(ErrorCodes.CHUNK_SIZE_MISMATCH, `mirror ${c.name}: state ${this.stateFile.file} was built with chunks of ${s.chunkSize} bytes but the config says ${c.chunkSize}`);
    }
    if (s && s.volumeSize !== this.volume.size) {
      throw new TmError(ErrorCodes.SIZE_MISMATCH, `mirror ${c.name}: volume ${c.volume} has ${this.volume.size} bytes, the mirror was built for ${s.volumeSize}; resizing is not supported yet`);
    }
    if (!s) {
      s = {
        format: STATE_FORMAT,
        role: 'primary',
        volumeId: randomBytes(16).toString('hex'),
        volumeSize: this.volume.size,
        chunkSize: c.chunkSize,
        generation: 0,
        committedGeneration: 0,
        pending: null,
        cursor: 0,
        oldestUncommittedAt: null,
      };
      await this.stateFile.save(s);
    }
    this.state = s;
    const picked = await createSource(c, this.volume, this.stateFile.dir);
    this.source = picked.source;
    if (picked.reason) this.log.info({ trackingMode: picked.source.mode }, `tracking.mode auto: ${picked.reason}`);
    await this.source.open(s.generation, s.committedGeneration);
    this.allocatedBytes = totalBytes(await this.volume.allocated());
    this.log.info({ generation: s.generation, committedGeneration: s.committedGeneration, pending: s.pending, volumeBytes: s.volumeSize, allocatedBytes: this.allocatedBytes }, 'primary mirror ready');
  }

  /** Stop replicating; state is persisted; idempotent. */
  async stop(): Promise<void> {
    this.abort.abort();
    this.session?.close();
    await this.loopDone;
    await this.source?.close().catch((e) => this.log.warn({ err: e }, 'persisting tracking state failed'));
    await this.volume?.close();
    this.phase = 'stopped';
  }

  private get signal(): AbortSignal {
    return this.abort.signal;
  }

  private async run(): Promise<void> {
    let backoff = this.config.reconnectMin;
    while (!this.signal.aborted) {
      if (this.phase !== 'error') this.phase = 'connecting';
      let session: Session | null = null;
      try {
        session = await this.connect();
        this.session = session;
        const { peerNode, ready } = await primaryHandshake(session, {
          node: this.ctx.nodeName,
          mirror: this.name,
          psk: this.ctx.psk,
          volumeSize: this.state.volumeSize,
          chunkSize: this.state.chunkSize,
          volumeId: this.state.volumeId,
          fresh: this.state.generation === 0 && this.state.committedGeneration === 0,
        });
        backoff = this.config.reconnectMin;
        this.lastError = null;
        this.sessions++;
        this.connectedSince = new Date();
        this.log.info({ peer: peerNode, committedGeneration: ready.committedGeneration, applying: ready.applying, sessions: this.sessions }, 'session established');
        await this.replicate(session, ready.committedGeneration, ready.applying);
      } catch (e) {
        const err = asTmError(e, ErrorCodes.INTERNAL, `mirror ${this.name}`);
        if (this.signal.aborted) break;
        session?.fail(err);
        this.lastError = err;
        this.phase = 'error';
        this.log.error({ code: err.code, retryInSeconds: REFUSALS.has(err.code) ? this.config.reconnectMax : backoff }, err.message);
        if (REFUSALS.has(err.code)) backoff = this.config.reconnectMax;
        await sleep(backoff * 1000, this.signal);
        backoff = Math.min(backoff * 2, this.config.reconnectMax);
      } finally {
        if (session) this.wireBytesBase += session.counters.bytesOut;
        this.session = null;
        this.connectedSince = null;
        this.progress = null;
      }
    }
  }

  private connect(): Promise<Session> {
    const url = this.config.peer!;
    const tls = url.startsWith('wss://') ? this.tls : null;
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, {
        perMessageDeflate: false,
        handshakeTimeout: 10_000,
        maxPayload: MAX_EXTENT_BYTES + 65536,
        // A zero mask makes ws skip masking (a copy and XOR of every payload byte).
        // Masking protects HTTP intermediaries from scripts in browsers; a daemon
        // talking to a daemon (inside TLS in production) has no use for it.
        generateMask: (mask: Buffer) => void mask.fill(0),
        // wss://: our client certificate; the secondary's is verified against our
        // CA only (not the system's) and against the URL's host (ws sends it as
        // SNI and Node checks the certificate's DNS or IP subjectAltName).
        ...(tls ? { ca: tls.ca, cert: tls.cert, key: tls.key, minVersion: 'TLSv1.2' as const, rejectUnauthorized: true } : {}),
      });
      const onAbort = () => ws.terminate();
      this.signal.addEventListener('abort', onAbort, { once: true });
      ws.once('open', () => {
        ws.removeAllListeners('error');
        ws.removeAllListeners('unexpected-response');
        this.signal.removeEventListener('abort', onAbort);
        resolve(new Session(ws, `secondary ${url}`));
      });
      ws.once('error', (err) => {
        this.signal.removeEventListener('abort', onAbort);
        reject(connectError(url, err));
      });
      // The listener answered the upgrade with a refusal (e.g. our certificate, TM_ERR_TLS).
      ws.once('unexpected-response', (_req, res) => {
        ws.on('error', () => {});
        void refusalOf(res, url).then((err) => {
          this.signal.removeEventListener('abort', onAbort);
          reject(err);
          ws.terminate();
        });
      });
    });
  }

  /** Send pending and new generations over an established session until it ends. */
  private async replicate(session: Session, peerCommitted: number, applying: { generation: number; cursor: number } | null): Promise<void> {
    const s = this.state;
    if (s.pending !== null && peerCommitted >= s.pending) {
      // The secondary committed it; the acknowledgement was lost with the last session.
      await this.markCommitted(s.pending);
    }
    if (s.generation === 0 && s.pending === null && (peerCommitted > 0 || applying !== null)) {
      // This primary has no tracking state but the secondary holds a replica
      // (it adopted our volume id): continue its numbering, compare digests.
      s.generation = s.committedGeneration = peerCommitted;
      s.reconcile = `this primary has no tracking state; the secondary holds generation ${peerCommitted}${applying ? ` and part of ${applying.generation}` : ''}`;
      await this.stateFile.save(s);
    }
    if (peerCommitted < s.committedGeneration && s.pending === null) {
      // The secondary lost its state (or its replica): nothing it holds is known.
      // Never assume it still holds what it acknowledged: compare digests.
      s.reconcile = `the secondary reports generation ${peerCommitted} but acknowledged ${s.committedGeneration}: its state was lost`;
      await this.stateFile.save(s);
    }
    let resume = applying && applying.generation === s.pending ? applying.cursor : 0;
    while (!this.signal.aborted) {
      if (s.pending !== null) {
        await this.sendGeneration(session, s.pending, resume);
        resume = 0;
        continue;
      }
      if (s.reconcile) {
        await this.reconcile(session, s.reconcile);
        continue;
      }
      if (s.generation === 0) {
        // Initial sync: generation 1 covers every chunk.
        await this.newGeneration(true);
        continue;
      }
      this.phase = 'in-sync';
      const wait = Math.max(0, this.lastDetectAt + this.config.tracking.interval * 1000 - Date.now());
      await sleep(wait, this.signal, session.closed);
      if (this.signal.aborted) return;
      if (!session.isOpen) throw (await session.closed) ?? new TmError(ErrorCodes.CONNECTION, 'session closed');
      await this.newGeneration(false);
    }
  }

  /**
   * One detection pass (`all`: every chunk, e.g. the initial sync); a
   * non-empty result becomes the next generation.
   */
  private async newGeneration(all: boolean): Promise<void> {
    const started = Date.now();
    this.lastDetectAt = started;
    const gen = this.state.generation + 1;
    const { bitmap, readBytes, baseLost } = await this.source.detect(gen, { all, signal: this.signal });
    if (baseLost) {
      this.state.reconcile = `the ${this.source.mode} change source lost its tracking state (no base to compare with)`;
      await this.stateFile.save(this.state);
      return;
    }
    this.allocatedBytes = totalBytes(await this.volume.allocated());
    if (bitmap.isEmpty) {
      this.log.debug({ readBytes, ms: Date.now() - started }, 'no changes');
      return;
    }
    await this.createGeneration(bitmap, started, readBytes);
  }

  private async createGeneration(bitmap: RoaringBitmap32, detectedAt: number, readBytes: number): Promise<void> {
    const s = this.state;
    const gen = s.generation + 1;
    await this.bitmaps.save(gen, bitmap);
    s.generation = gen;
    s.pending = gen;
    s.cursor = 0;
    s.oldestUncommittedAt ??= detectedAt;
    s.reconcile = null;
    await this.stateFile.save(s);
    this.cycle = { generation: gen, started: detectedAt, readBytes, changedBytes: this.bitmapBytes(bitmap), wireAtStart: this.wireBytes() };
    this.log.info({ generation: gen, chunks: bitmap.size, changedBytes: this.cycle.changedBytes }, 'generation created');
  }

  /**
   * Tracking state was lost: freeze a view as the next generation, ask the
   * secondary for the digests of its chunks, compare with ours and make the
   * chunks that differ that generation (possibly empty: it still commits, so
   * the view becomes the base). One window is requested ahead so that both
   * sides read at once. Costs a read of the allocated data on both sides and
   * 16 bytes per chunk on the wire, never a copy of everything.
   */
  private async reconcile(session: Session, reason: string): Promise<void> {
    const s = this.state;
    const cs = s.chunkSize;
    const size = s.volumeSize;
    const gen = s.generation + 1;
    const started = Date.now();
    this.phase = 'reconciling';
    this.lastDetectAt = started;
    const report: ReconcileReport = { reason, generation: gen, doneBytes: 0, totalBytes: size, differingBytes: 0, finished: false };
    this.reconcileReport = report;
    this.log.warn({ reason, generation: gen }, 'tracking state lost: comparing digests with the secondary');
    await this.source.detect(gen, { all: true, signal: this.signal });
    const view = await this.source.view(gen);
    const alloc = await view.allocated(cs);
    const bitmap = new RoaringBitmap32();
    const windows: [number, number][] = [];
    for (let off = 0; off < size; off += MAX_DIGEST_RANGE) windows.push([off, Math.min(MAX_DIGEST_RANGE, size - off)]);
    const request = (i: number) => session.send({ type: 'digest-req', offset: windows[i]![0], length: windows[i]![1] });
    if (windows.length > 0) request(0);
    let readBytes = 0;
    const mine = Buffer.alloc(DIGEST_BYTES);
    let ai = 0;
    for (let i = 0; i < windows.length; i++) {
      if (i + 1 < windows.length) request(i + 1);
      const [off, len] = windows[i]!;
      const m = await session.next();
      if (m.type !== 'digests' || m.offset !== off || m.length !== len) {
        throw new TmError(ErrorCodes.PROTOCOL, `expected the digests of ${off}+${len} from the secondary, got ${m.type}${m.type === 'digests' ? ` of ${m.offset}+${m.length}` : ''}`);
      }
      this.signal.throwIfAborted();
      const theirs = m.digests;
      const differs = (c: number) => mine.compare(theirs, (c - off / cs) * DIGEST_BYTES, (c - off / cs + 1) * DIGEST_BYTES) !== 0;
      const end = off + len;
      let pos = off;
      while (pos < end) {
        while (ai < alloc.length && alloc[ai]!.offset + alloc[ai]!.length <= pos) ai++;
        const r = alloc[ai];
        const holeEnd = !r || r.offset >= end ? end : Math.max(pos, r.offset);
        if (holeEnd > pos) {
          // Unallocated here: zeros without reading.
          mine.fill(0);
          for (let c = pos / cs; c < Math.ceil(holeEnd / cs); c++) {
            if (differs(c)) bitmap.add(c);
            else this.source.recordSent(c, null);
          }
          pos = holeEnd;
          continue;
        }
        const stop = Math.min(end, r!.offset + r!.length, pos + MAX_EXTENT_BYTES);
        const buf = await view.read(pos, stop - pos);
        readBytes += buf.length;
        for (let at = 0; at < buf.length; at += cs) {
          const chunk = buf.subarray(at, Math.min(at + cs, buf.length));
          const c = (pos + at) / cs;
          chunkDigest(chunk, mine, 0);
          if (differs(c)) bitmap.add(c);
          else this.source.recordSent(c, mine.equals(ZERO16) ? null : chunk);
        }
        pos = stop;
      }
      report.doneBytes = end;
      report.differingBytes = this.bitmapBytes(bitmap);
    }
    await this.createGeneration(bitmap, started, readBytes);
    report.finished = true;
    this.log.info({ generation: gen, differingBytes: report.differingBytes, readBytes, seconds: (Date.now() - started) / 1000 }, 'digests compared: the chunks that differ become the next generation');
  }

  private bitmapBytes(bitmap: RoaringBitmap32, fromChunk = 0): number {
    const cs = this.state.chunkSize;
    const n = Math.ceil(this.state.volumeSize / cs);
    let bytes = bitmap.rangeCardinality(fromChunk, n) * cs;
    if (bitmap.has(n - 1) && n - 1 >= fromChunk) bytes -= n * cs - this.state.volumeSize;
    return bytes;
  }

  private async sendGeneration(session: Session, gen: number, resumeFrom: number): Promise<void> {
    const s = this.state;
    const cs = s.chunkSize;
    const bitmap = await this.bitmaps.load(gen);
    const view = await this.source.view(gen);
    const total = this.bitmapBytes(bitmap);
    const fromChunk = Math.ceil(resumeFrom / cs);
    this.phase = s.committedGeneration === 0 ? 'initial-sync' : 'syncing';
    this.progress = { generation: gen, doneBytes: total - this.bitmapBytes(bitmap, fromChunk), totalBytes: total };
    this.cycle ??= { generation: gen, started: Date.now(), readBytes: 0, changedBytes: total, wireAtStart: this.wireBytes() };
    this.log.info({ generation: gen, resumeFrom, totalBytes: total, doneBytes: this.progress.doneBytes }, resumeFrom > 0 ? 'resuming generation' : 'sending generation');

    const flow = new FlowControl(this.config.maxInFlight);
    // Our own checkpoint follows each of the secondary's, beside the ack loop:
    // digests first, then the cursor. One at a time; a later one coalesces.
    let persisting: Promise<void> | null = null;
    let persistAgain = false;
    const persistSoon = () => {
      if (persisting) {
        persistAgain = true;
        return;
      }
      persisting = (async () => {
        do {
          persistAgain = false;
          await this.source.persist();
          await this.stateFile.save(s);
        } while (persistAgain);
      })().finally(() => (persisting = null));
      persisting.catch((e) => flow.fail(asTmError(e, ErrorCodes.STATE, `mirror ${this.name}`)));
    };
    const reader = (async () => {
      for (;;) {
        const m = await session.next();
        if (m.type === 'ack') {
          flow.acked(m.seq);
          if (this.progress) this.progress.doneBytes = total - this.bitmapBytes(bitmap, Math.ceil(flow.ackedEnd / cs));
          if (m.durable > s.cursor) {
            // The secondary made a checkpoint: make ours too, so that after a crash
            // neither the cursor nor the digests of what it holds are lost.
            s.cursor = m.durable;
            persistSoon();
          }
        } else if (m.type === 'committed') {
          if (m.generation !== gen || !flow.drained) {
            throw new TmError(ErrorCodes.PROTOCOL, `committed(${m.generation}) while generation ${gen} has extents unacknowledged`);
          }
          return;
        } else {
          throw new TmError(ErrorCodes.PROTOCOL, `unexpected ${m.type} frame from the secondary during generation ${gen}`);
        }
      }
    })();
    reader.catch((e) => flow.fail(asTmError(e, ErrorCodes.CONNECTION)));

    session.send({ type: 'begin', generation: gen, resumeFrom });
    let seq = 0;
    for await (const ext of this.extents(view, bitmap, fromChunk)) {
      await flow.ready();
      if (this.signal.aborted) throw new TmError(ErrorCodes.ABORTED, 'stopping');
      const msg = { ...ext, seq: ++seq } as ExtentMsg;
      if (this.ctx.throttle) await this.ctx.throttle((msg.payload?.length ?? 0) + FRAME_OVERHEAD, this.signal);
      const n = session.send(msg);
      flow.sent(seq, n, msg.offset + msg.length);
      if (msg.kind === 'data') this.sentBytes += msg.length;
    }
    session.send({ type: 'commit', generation: gen });
    try {
      await reader;
    } finally {
      if (persisting) await persisting;
    }
    await this.markCommitted(gen);
  }

  private async markCommitted(gen: number): Promise<void> {
    const s = this.state;
    // Digests first: a stale digest only causes a resend; the bitmap goes last.
    await this.source.persist();
    s.committedGeneration = gen;
    s.pending = null;
    s.cursor = 0;
    s.oldestUncommittedAt = null;
    await this.stateFile.save(s);
    await this.source.committed(gen);
    await this.bitmaps.remove(gen);
    if (this.cycle && this.cycle.generation === gen) {
      this.lastCycle = {
        generation: gen,
        changedBytes: this.cycle.changedBytes,
        readBytes: this.cycle.readBytes,
        wireBytes: this.wireBytes() - this.cycle.wireAtStart,
        durationSeconds: (Date.now() - this.cycle.started) / 1000,
      };
    }
    this.cycle = null;
    this.progress = null;
    this.phase = 'in-sync';
    this.log.info({ generation: gen, lastCycle: this.lastCycle }, 'generation committed by the secondary');
  }

  /**
   * The byte ranges of a generation, in ascending order, cut against the
   * allocation map: holes (never read) and allocated pieces of at most
   * `maxExtent` bytes.
   */
  private *segments(bitmap: RoaringBitmap32, alloc: ByteRange[], fromChunk: number): Generator<Segment> {
    const cs = this.state.chunkSize;
    const size = this.state.volumeSize;
    const maxExtent = this.config.maxExtent;
    let ai = 0;
    for (const [a, b] of bitmapRuns(bitmap, fromChunk)) {
      let pos = a * cs;
      const end = Math.min(b * cs, size);
      while (pos < end) {
        while (ai < alloc.length && alloc[ai]!.offset + alloc[ai]!.length <= pos) ai++;
        const r = alloc[ai];
        if (!r || r.offset >= end) {
          yield { hole: true, offset: pos, length: end - pos };
          pos = end;
        } else if (r.offset > pos) {
          yield { hole: true, offset: pos, length: r.offset - pos };
          pos = r.offset;
        } else {
          const stop = Math.min(end, r.offset + r.length, pos + maxExtent);
          yield { hole: false, offset: pos, length: stop - pos };
          pos = stop;
        }
      }
    }
  }

  /**
   * Extents of a generation with up to READ_AHEAD pieces (READ_AHEAD_BYTES) read
   * and compressed ahead of the socket. Pieces are read into one ring of
   * buffers: a piece's buffer goes back when the consumer asks for what follows
   * its extents, i.e. after it has encoded (copied) and sent all of them.
   */
  private async *extents(view: Volume, bitmap: RoaringBitmap32, fromChunk: number): AsyncGenerator<Prepared> {
    const alloc = await view.allocated(this.state.chunkSize);
    // A piece takes twice its length: the bytes read, then room for their lz4 form.
    const ring = new ReadRing(2 * (READ_AHEAD_BYTES + 2 * this.config.maxExtent));
    const ahead: { p: Promise<Prepared[]>; bytes: number; buf: Buffer | null }[] = [];
    let aheadBytes = 0;
    const next = async function* () {
      const a = ahead.shift()!;
      aheadBytes -= a.bytes;
      yield* await a.p;
      if (a.buf) ring.release(a.buf);
    };
    for (const seg of this.segments(bitmap, alloc, fromChunk)) {
      const buf = seg.hole ? null : ring.take(2 * seg.length);
      const p = seg.hole ? Promise.resolve(this.hole(seg)) : this.prepare(view, seg, buf!);
      p.catch(() => {}); // awaited below in order; avoid an unhandled rejection meanwhile
      const bytes = seg.hole ? 0 : seg.length;
      ahead.push({ p, bytes, buf });
      aheadBytes += bytes;
      while (ahead.length >= READ_AHEAD || aheadBytes >= READ_AHEAD_BYTES) yield* next();
    }
    while (ahead.length) yield* next();
  }

  private hole(seg: Segment): Prepared[] {
    const cs = this.state.chunkSize;
    this.source.recordSent(seg.offset / cs, null, Math.ceil(seg.length / cs));
    return [{ type: 'extent', kind: 'trim', offset: seg.offset, length: seg.length }];
  }

  /**
   * Read one allocated piece into the first half of `into` (2 × its length);
   * all-zero chunks become zero extents, the rest data, lz4-compressed into the
   * second half.
   */
  private async prepare(view: Volume, seg: Segment, into: Buffer): Promise<Prepared[]> {
    const cs = this.state.chunkSize;
    const buf = await view.read(seg.offset, seg.length, into.subarray(0, seg.length));
    const lz4Room = into.subarray(seg.length);
    if (this.cycle) this.cycle.readBytes += seg.length;
    const out: Prepared[] = [];
    const runs: { zero: boolean; start: number; end: number }[] = [];
    for (let at = 0; at < buf.length; at += cs) {
      const chunk = buf.subarray(at, Math.min(at + cs, buf.length));
      const zero = isAllZero(chunk);
      this.source.recordSent((seg.offset + at) / cs, zero ? null : chunk);
      const last = runs[runs.length - 1];
      if (last && last.zero === zero) last.end = at + chunk.length;
      else runs.push({ zero, start: at, end: at + chunk.length });
    }
    for (const r of runs) {
      const offset = seg.offset + r.start;
      const length = r.end - r.start;
      if (r.zero) {
        out.push({ type: 'extent', kind: 'zero', offset, length });
      } else {
        const raw = buf.subarray(r.start, r.end);
        const { codec, payload, crc32c } = await compressPayload(raw, lz4Room.subarray(r.start, r.end));
        out.push({ type: 'extent', kind: 'data', offset, length, codec, crc32c, payload });
      }
    }
    return out;
  }

  private wireBytes(): number {
    return this.wireBytesBase + (this.session?.counters.bytesOut ?? 0);
  }

  status(): MirrorStatus {
    const s = this.state;
    const c = this.config;
    const pendingBytes = this.progress ? this.progress.totalBytes - this.progress.doneBytes : 0;
    return {
      name: c.name,
      role: 'primary',
      state: this.phase,
      volume: c.volume,
      peer: c.peer ?? null,
      trackingMode: this.source?.mode ?? c.tracking.mode,
      chunkSize: c.chunkSize,
      volumeBytes: s?.volumeSize ?? 0,
      allocatedBytes: this.allocatedBytes,
      sentBytes: this.sentBytes,
      wireBytes: this.wireBytes(),
      dirtyBytes: s?.pending != null ? pendingBytes || (this.cycle?.changedBytes ?? 0) : 0,
      generation: s?.generation ?? 0,
      committedGeneration: s?.committedGeneration ?? 0,
      lagSeconds: !s ? null : s.oldestUncommittedAt === null ? 0 : (Date.now() - s.oldestUncommittedAt) / 1000,
      progress: this.progress ? { ...this.progress } : null,
      lastCycle: this.lastCycle,
      reconcile: this.reconcileReport ? { ...this.reconcileReport } : null,
      error: this.lastError ? this.lastError.toJSON() : null,
      sessions: this.sessions,
      connectedSince: this.connectedSince ? this.connectedSince.toISOString() : null,
    };
  }
}
