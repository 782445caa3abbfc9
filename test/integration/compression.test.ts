import { expect } from 'chai';
import { formatStatus } from '../../src/cli/status.js';
import { controlGet } from '../../src/daemon/control.js';
import type { CompressionMode } from '../../src/mirror/settings.js';
import { createSampleVolume } from '../../src/util/sample.js';
import { Pair, sha256File } from '../helpers/pair.js';
import { key, parseExposition } from '../helpers/prometheus.js';

const MiB = 1024 * 1024;

/**
 * Issue 13 §1: `compression:` per primary mirror, with real daemons on
 * loopback. The secondary has no setting: it applies whatever codec each
 * extent names, which the identical images prove.
 */
describe('integration: compression off | lz4 | auto (two daemons on loopback)', function () {
  this.timeout(180_000);
  let pair: Pair | undefined;
  afterEach(async () => {
    await pair?.cleanup();
    pair = undefined;
  });

  async function sync(mode: CompressionMode | null, content: 'text' | 'random', allocated: number) {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 256 * MiB, allocated, extents: 12, seed: 13, content });
    await pair.writeConfigs(mode ? { extraPrimary: { compression: mode } } : {});
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const m = await pair.waitInSync(1);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
    const metrics = parseExposition((await controlGet(pair.cfg.primaryState, '/metrics')).body);
    const text = formatStatus(await pair.primary!.status());
    return { m, z: m.compression!, metrics, text };
  }

  const codecGauge = (metrics: Map<string, number>, codec: string) => metrics.get(key('thinmirror_mirror_compression_codec', { mirror: 'vm1', role: 'primary', codec }));

  it('off sends every data extent raw', async () => {
    const { m, z, metrics, text } = await sync('off', 'text', 32 * MiB);
    expect(z).to.include({ mode: 'off', codec: 'raw', ratio: 1, lz4Ratio: null });
    expect(z.payloadBytes).to.equal(m.sentBytes);
    expect(z.compressedPayloadBytes).to.equal(m.sentBytes);
    // Raw text on the wire: frames hold the whole payload.
    expect(m.wireBytes).to.be.greaterThan(m.sentBytes);
    expect(codecGauge(metrics, 'raw')).to.equal(1);
    expect(codecGauge(metrics, 'lz4')).to.equal(0);
    expect(metrics.get(key('thinmirror_mirror_compression_ratio', { mirror: 'vm1', role: 'primary' }))).to.equal(1);
    expect(text).to.contain('vm1: compression off, sending raw (wire/payload 1.000)');
  });

  it('lz4 compresses every piece of text-like data', async () => {
    const { m, z, metrics, text } = await sync('lz4', 'text', 32 * MiB);
    expect(z).to.include({ mode: 'lz4', codec: 'lz4', reason: null });
    expect(z.ratio).to.be.below(0.5);
    expect(z.payloadBytes).to.equal(m.sentBytes);
    expect(m.wireBytes).to.be.below(m.sentBytes * 0.5);
    expect(codecGauge(metrics, 'lz4')).to.equal(1);
    expect(codecGauge(metrics, 'raw')).to.equal(0);
    expect(metrics.get(key('thinmirror_mirror_compression_ratio', { mirror: 'vm1', role: 'primary' }))).to.be.closeTo(z.ratio!, 0.01);
    expect(metrics.get(key('thinmirror_mirror_compressed_payload_bytes_total', { mirror: 'vm1', role: 'primary' }))).to.equal(z.compressedPayloadBytes);
    expect(text).to.match(/vm1: compression lz4, sending lz4 \(wire\/payload 0\.\d+, lz4 0\.\d+ where tried\)/);
  });

  it('auto is the default; it measures both codecs and status and /metrics show its choice and the ratio', async () => {
    // 160 MiB: five windows of 32 MiB, enough for lz4 and raw to be measured once each.
    const { m, z, metrics, text } = await sync(null, 'text', 160 * MiB);
    expect(z.mode).to.equal('auto');
    expect(z.codec).to.be.oneOf(['raw', 'lz4']);
    expect(z.rates.lz4, 'lz4 measured').to.be.a('number').and.above(0);
    expect(z.rates.raw, 'raw measured').to.be.a('number').and.above(0);
    expect(z.reason).to.match(z.codec === 'lz4' ? /^lz4 delivers more/ : /^raw delivers as much or more/);
    // Both codecs were used: the ratio lies between lz4's and raw's.
    expect(z.lz4Ratio).to.be.below(0.5);
    expect(z.ratio).to.be.above(z.lz4Ratio!).and.below(1);
    expect(z.payloadBytes).to.equal(m.sentBytes);
    expect(codecGauge(metrics, z.codec)).to.equal(1);
    expect(codecGauge(metrics, z.codec === 'lz4' ? 'raw' : 'lz4')).to.equal(0);
    expect(text).to.contain(`vm1: compression auto, sending ${z.codec} (wire/payload ${z.ratio!.toFixed(3)}`);
  });

  it('auto stops trying to compress random data', async () => {
    const { m, z, text } = await sync('auto', 'random', 24 * MiB);
    expect(z).to.include({ mode: 'auto', codec: 'raw' });
    expect(z.reason).to.contain('does not compress');
    // Chunks at the edges of extents are partly zeros: the few tried there compress.
    expect(z.ratio).to.be.above(0.98);
    expect(z.lz4Ratio).to.be.above(0.95); // tried (and failed) before it stopped
    expect(m.wireBytes).to.be.greaterThan(m.sentBytes * 0.98);
    expect(text).to.contain('vm1: compression auto, sending raw');
  });
});
