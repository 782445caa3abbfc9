import { expect } from 'chai';
import { copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { TmError } from '../../src/errors.js';
import { RoaringBitmap32 } from '../../src/track/bitmap-store.js';
import { parseHeldMetadataRoot, dmName } from '../../src/track/lvm.js';
import {
  blockRangesToBytes,
  blockRangesToChunks,
  runTool,
  thinDelta,
  ThinDeltaParser,
  thinDump,
  ThinDumpParser,
  type BlockRange,
} from '../../src/track/thin-meta.js';
import { heldRootOf, holdMetadataSnapshot, needTools, poolXml, restoreMetadata, type Mapping } from '../helpers/fake-lvm.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A mapping from [thinBlock, dataBlock, count] runs. */
function mapping(...runs: [number, number, number][]): Mapping {
  const m: Mapping = new Map();
  for (const [b, d, n] of runs) for (let i = 0; i < n; i++) m.set(b + i, d + i);
  return m;
}

function bits(b: RoaringBitmap32): number[] {
  return Array.from(b.toArray());
}

function range(from: number, to: number): number[] {
  return Array.from({ length: to - from }, (_, i) => from + i);
}

async function tmErr(p: Promise<unknown>): Promise<TmError> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e, 'expected a rejection').to.be.instanceOf(TmError);
  return e as TmError;
}

describe('thin-pool metadata through thin_dump / thin_delta (real metadata files built with thin_restore)', () => {
  let dir: string;
  let n = 0;
  const metaFile = () => path.join(dir, `pool${n++}.meta`);
  before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-thinmeta-'))));
  after(() => rmSync(dir, { recursive: true, force: true }));

  describe('thin block 64 KiB (128 sectors), chunk 256 KiB: four thin blocks per chunk', () => {
    // Device 1: the older snapshot. Device 2: a snapshot taken later, sharing
    // data blocks with device 1 except where the origin was written (block 2
    // remapped), discarded (block 10), written fresh (block 30) and grown past
    // the 4 MiB volume (blocks 64-65: the thin device is bigger than the volume).
    const dev1 = mapping([0, 0, 6], [10, 6, 1], [20, 7, 4], [40, 11, 1], [63, 12, 1]);
    const dev2 = mapping([0, 0, 2], [2, 20, 1], [3, 3, 3], [20, 7, 4], [30, 21, 1], [40, 11, 1], [63, 12, 1], [64, 22, 2]);
    const volumeSize = 4 * MiB;
    const chunk = 256 * KiB;
    let meta: string;
    before(() => {
      needTools('thin_restore');
      meta = metaFile();
      restoreMetadata(poolXml(128, 1000, [{ devId: 1, mappings: dev1 }, { devId: 2, mappings: dev2 }]), meta);
    });

    it('thin_dump: the mapped ranges of one device, in thin blocks, adjacent runs merged; its chunks', async () => {
      needTools('thin_dump');
      const d1 = await thinDump(meta, 1);
      expect(d1.dataBlockSize).to.equal(64 * KiB);
      expect(d1.mapped).to.deep.equal([
        { begin: 0, length: 6 },
        { begin: 10, length: 1 },
        { begin: 20, length: 4 },
        { begin: 40, length: 1 },
        { begin: 63, length: 1 },
      ]);
      expect(bits(blockRangesToChunks(d1.mapped, d1.dataBlockSize, chunk, volumeSize / chunk))).to.deep.equal([0, 1, 2, 5, 10, 15]);
      const d2 = await thinDump(meta, 2);
      // 0-1 and 2 and 3-5 are three XML elements (different data runs) but one thin-block run.
      expect(d2.mapped).to.deep.equal([
        { begin: 0, length: 6 },
        { begin: 20, length: 4 },
        { begin: 30, length: 1 },
        { begin: 40, length: 1 },
        { begin: 63, length: 3 },
      ]);
      expect(blockRangesToBytes(d2.mapped, d2.dataBlockSize, volumeSize)).to.deep.equal([
        { offset: 0, length: 6 * 64 * KiB },
        { offset: 20 * 64 * KiB, length: 4 * 64 * KiB },
        { offset: 30 * 64 * KiB, length: 64 * KiB },
        { offset: 40 * 64 * KiB, length: 64 * KiB },
        { offset: 63 * 64 * KiB, length: 64 * KiB }, // clipped at the volume's end
      ]);
    });

    it('thin_delta: different, left_only and right_only are changes, same is not; chunks clipped to the volume', async () => {
      needTools('thin_delta');
      const d = await thinDelta(meta, 1, 2);
      expect(d.dataBlockSize).to.equal(64 * KiB);
      expect(d.changed).to.deep.equal([
        { begin: 2, length: 1 }, // different
        { begin: 10, length: 1 }, // left_only (discarded)
        { begin: 30, length: 1 }, // right_only (new)
        { begin: 64, length: 2 }, // right_only, past the volume
      ]);
      expect(bits(blockRangesToChunks(d.changed, d.dataBlockSize, chunk, volumeSize / chunk))).to.deep.equal([0, 2, 7]);
      // Same devices the other way round: the same blocks.
      const back = await thinDelta(meta, 2, 1);
      expect(back.changed).to.deep.equal(d.changed);
      // A device against itself: nothing.
      expect((await thinDelta(meta, 1, 1)).changed).to.deep.equal([]);
    });

    it('with -m, the tools read the metadata snapshot held in the superblock (held the way the kernel does it)', async () => {
      needTools('thin_delta', 'thin_dump');
      // Without a held snapshot, -m fails: the real tool's message, the command and its status are in the error.
      const e = await tmErr(thinDelta(meta, 1, 2, { metadataSnap: true }));
      expect(e.code).to.equal('TM_ERR_LVM');
      expect(e.message).to.include(`thin_delta -m --snap1 1 --snap2 2 ${meta} failed (exit status 1)`);
      expect(e.message).to.include('no current metadata snap');

      const held = path.join(dir, 'held.meta');
      copyFileSync(meta, held);
      const block = holdMetadataSnapshot(held);
      expect(heldRootOf(held)).to.equal(block);
      const d = await thinDelta(held, 1, 2, { metadataSnap: true });
      expect(d.changed).to.deep.equal((await thinDelta(meta, 1, 2)).changed);
      const dump = await thinDump(held, 2, { metadataSnap: true });
      expect(dump.mapped).to.deep.equal((await thinDump(meta, 2)).mapped);
    });

    it('a device the pool does not hold: TM_ERR_LVM naming the command, exit status and stderr', async () => {
      needTools('thin_delta', 'thin_dump');
      const e = await tmErr(thinDelta(meta, 1, 9));
      expect(e.code).to.equal('TM_ERR_LVM');
      expect(e.message).to.match(/^thin_delta --snap1 1 --snap2 9 \S+ failed \(exit status 1\); stderr: /);
      expect(e.message).to.include('Unable to find mapping tree for snap2 (9)');
      // thin_dump exits 0 with an empty <superblock> for an unknown device: the parser notices.
      const e2 = await tmErr(thinDump(meta, 9));
      expect(e2.code).to.equal('TM_ERR_LVM');
      expect(e2.message).to.equal(`thin_dump of device 9 in ${meta}: device 9 not found in the pool metadata`);
    });
  });

  it('thin block 512 KiB (1024 sectors), chunk 64 KiB: one thin block marks eight chunks; the tail is clipped', async () => {
    needTools('thin_restore', 'thin_delta', 'thin_dump');
    const meta = metaFile();
    // Volume 3.5 MiB: thin blocks 0-6 (block 6 is its last 512 KiB), 56 chunks.
    const dev1 = mapping([0, 0, 1], [3, 1, 1], [6, 2, 1]);
    const dev2 = mapping([0, 0, 1], [3, 5, 1], [5, 6, 1], [7, 7, 1]);
    restoreMetadata(poolXml(1024, 100, [{ devId: 1, mappings: dev1 }, { devId: 2, mappings: dev2 }]), meta);
    const d = await thinDelta(meta, 1, 2);
    expect(d.dataBlockSize).to.equal(512 * KiB);
    // 3 different; 5 right_only and 6 left_only touch: one run; 7 right_only touches too.
    expect(d.changed).to.deep.equal([
      { begin: 3, length: 1 },
      { begin: 5, length: 3 },
    ]);
    const volumeSize = 3.5 * MiB;
    const chunks = Math.ceil(volumeSize / (64 * KiB));
    expect(chunks).to.equal(56);
    expect(bits(blockRangesToChunks(d.changed, d.dataBlockSize, 64 * KiB, chunks))).to.deep.equal([...range(24, 32), ...range(40, 56)]);
    const dump = await thinDump(meta, 2);
    expect(bits(blockRangesToChunks(dump.mapped, dump.dataBlockSize, 64 * KiB, chunks))).to.deep.equal([...range(0, 8), ...range(24, 32), ...range(40, 48)]);
  });

  it('streams a large dump: 20000 separate mappings parsed line by line', async () => {
    needTools('thin_restore', 'thin_delta', 'thin_dump');
    const meta = metaFile();
    const dev1: Mapping = new Map();
    const dev2: Mapping = new Map();
    for (let i = 0; i < 20000; i++) {
      dev1.set(i * 2, i); // every other block
      dev2.set(i * 2, i % 3 === 0 ? 30000 + i : i); // every third of them rewritten
    }
    restoreMetadata(poolXml(128, 60000, [{ devId: 1, mappings: dev1 }, { devId: 2, mappings: dev2 }]), meta);
    const dump = await thinDump(meta, 1);
    expect(dump.mapped.length).to.equal(20000);
    const delta = await thinDelta(meta, 1, 2);
    expect(delta.changed.length).to.equal(Math.ceil(20000 / 3));
    expect(delta.changed.every((r, k) => r.begin === k * 6 && r.length === 1)).to.equal(true);
  });

  it('a missing program is TM_ERR_TOOL_MISSING saying which package to install', async () => {
    const e = await tmErr(runTool('thin_no_such_tool', ['x']));
    expect(e.code).to.equal('TM_ERR_TOOL_MISSING');
    expect(e.message).to.include('install thin-provisioning-tools');
    const e2 = await tmErr(runTool('lvcreate_no_such_tool', []));
    expect(e2.message).to.include('install lvm2');
  });

  it('an abort kills the tool: TM_ERR_ABORTED', async () => {
    const ac = new AbortController();
    const p = runTool('sleep', ['30'], { signal: ac.signal });
    ac.abort();
    expect((await tmErr(p)).code).to.equal('TM_ERR_ABORTED');
  });

  describe('parsers (pure)', () => {
    it('accept data_block_size with a " sectors" suffix; refuse verbose thin_delta output and foreign elements', () => {
      const p = new ThinDeltaParser();
      for (const l of ['<superblock uuid="" time="1" transaction="2" data_block_size="128 sectors" nr_data_blocks="10">', '  <diff left="1" right="2">', '    <different begin="4" length="2"/>', '  </diff>', '</superblock>']) p.line(l);
      expect(p.result()).to.deep.equal({ dataBlockSize: 64 * KiB, changed: [{ begin: 4, length: 2 }] });

      const v = new ThinDeltaParser();
      v.line('<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="10">');
      v.line('<diff left="1" right="2">');
      expect(() => v.line('<different>')).to.throw(TmError, /verbose/);

      const d = new ThinDumpParser(1);
      d.line('<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="10">');
      expect(() => d.line('<def name="x">')).to.throw(TmError, /unexpected element <def>/);
      expect(() => new ThinDumpParser(1).result()).to.throw(TmError, /incomplete/);
    });

    it('refuse out-of-order ranges and truncated output', () => {
      const p = new ThinDeltaParser();
      p.line('<superblock data_block_size="128">');
      p.line('<diff left="1" right="2">');
      p.line('<right_only begin="10" length="2"/>');
      expect(() => p.line('<left_only begin="5" length="1"/>')).to.throw(TmError, /out of order/);
      const q = new ThinDeltaParser();
      q.line('<superblock data_block_size="128">');
      q.line('<diff left="1" right="2">');
      expect(() => q.result()).to.throw(TmError, /incomplete/);
    });

    it('blockRangesToChunks: neither size need divide the other; partial coverage marks the chunk', () => {
      const r: BlockRange[] = [{ begin: 1, length: 1 }];
      // 96 KiB thin blocks, 64 KiB chunks: block 1 is [96, 192) KiB → chunks 1 and 2.
      expect(bits(blockRangesToChunks(r, 96 * KiB, 64 * KiB, 100))).to.deep.equal([1, 2]);
      expect(bits(blockRangesToChunks([{ begin: 0, length: 1 }], 96 * KiB, 64 * KiB, 100))).to.deep.equal([0, 1]);
      // 64 KiB blocks, 96 KiB chunks: block 1 is [64, 128) → chunks 0 and 1; block 2 [128, 192) → chunk 1.
      expect(bits(blockRangesToChunks([{ begin: 1, length: 2 }], 64 * KiB, 96 * KiB, 100))).to.deep.equal([0, 1]);
      expect(bits(blockRangesToChunks([{ begin: 1, length: 2 }], 64 * KiB, 96 * KiB, 1))).to.deep.equal([0]);
      expect(bits(blockRangesToChunks([], 64 * KiB, 96 * KiB, 1))).to.deep.equal([]);
    });

    it('dm names and the held metadata root in dmsetup status', () => {
      expect(dmName('vg-a', 'pool_tmeta')).to.equal('vg--a-pool_tmeta');
      expect(parseHeldMetadataRoot('0 2097152 thin-pool 1 178/4161600 2/524288 - rw discard_passdown queue_if_no_space - 1024', 's')).to.equal(null);
      expect(parseHeldMetadataRoot('0 2097152 thin-pool 1 178/4161600 2/524288 4095 rw discard_passdown queue_if_no_space - 1024', 's')).to.equal(4095);
      expect(() => parseHeldMetadataRoot('0 2097152 linear', 's')).to.throw(TmError, /not a thin-pool/);
    });
  });
});
