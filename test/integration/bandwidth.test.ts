import { expect } from 'chai';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DaemonProcess } from '../../src/cli/daemon-process.js';
import { createSampleVolume } from '../../src/util/sample.js';
import { freePort, sha256File, startPair, writeMirrorConfigs } from '../helpers/pair-config.js';

const MiB = 1024 * 1024;
/** The token bucket's default burst for these caps (a quarter second, at least 64 KiB). */
const burstOf = (rate: number) => Math.max(Math.ceil(rate / 4), 64 * 1024);
/** Bytes on the wire the daemon counts besides what the bucket is charged for: handshake and digests, generously. */
const SLACK = 256 * 1024;

/**
 * The cap is checked as an invariant, not as a speed: at every status sample,
 * the wire bytes sent so far must not exceed what the bucket can have admitted
 * since before the primary was started (rate x elapsed + burst). A slow machine
 * only makes the check easier to meet; without a working cap the mirror sends
 * its whole volume within the first second and the check fails.
 */
describe('bandwidth caps (two daemons as child processes, random data so the wire carries the payload)', function () {
  this.timeout(120_000);
  let dir: string;
  const daemons: DaemonProcess[] = [];

  beforeEach(async () => {
    dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tm-it-bw-'));
  });

  afterEach(async () => {
    await Promise.all(daemons.splice(0).map((d) => d.stop()));
    await fsp.rm(dir, { recursive: true, force: true });
  });

  async function start(o: { mirrors: string[]; mirrorCap?: string; peerCap?: string; allocated: number }) {
    const port = await freePort();
    for (const [i, m] of o.mirrors.entries()) {
      await createSampleVolume(path.join(dir, `${m}.img`), { size: 64 * MiB, allocated: o.allocated, extents: 8, seed: 11 + i, content: 'random' });
    }
    const cfg = await writeMirrorConfigs({
      dir,
      port,
      interval: '1h',
      mirrors: o.mirrors.map((m) => ({ name: m, source: path.join(dir, `${m}.img`), target: path.join(dir, `${m}.target.img`) })),
      ...(o.peerCap ? { primaryTop: { peers: [{ url: `ws://127.0.0.1:${port}`, bandwidth: o.peerCap }] } } : {}),
      ...(o.mirrorCap ? { extraPrimary: { bandwidth: o.mirrorCap } } : {}),
    });
    return startPair(cfg, dir, daemons);
  }

  /** Poll until every mirror is in sync, checking the cap at every sample; returns the samples. */
  async function watch(primary: DaemonProcess, t0: number, rate: number, count: number) {
    const samples: { t: number; wire: number; each: number[] }[] = [];
    await primary.waitFor(
      (s) => {
        const t = (performance.now() - t0) / 1000;
        const wire = s.mirrors.reduce((a, m) => a + m.wireBytes, 0);
        samples.push({ t, wire, each: s.mirrors.map((m) => m.wireBytes) });
        expect(wire, `${wire} wire bytes after ${t.toFixed(2)} s under a cap of ${rate} B/s`).to.be.at.most(rate * t + burstOf(rate) + SLACK);
        return s.mirrors.length === count && s.mirrors.every((m) => m.state === 'in-sync' && m.committedGeneration >= 1);
      },
      90_000,
      'in-sync under a bandwidth cap',
      100,
    );
    return samples;
  }

  it('bandwidth: 4MiB/s on a mirror holds its sends under the cap at every sample, and the replica is complete', async () => {
    const { primary, t0 } = await start({ mirrors: ['vm1'], mirrorCap: '4MiB/s', allocated: 16 * MiB });
    const samples = await watch(primary, t0, 4 * MiB, 1);
    // The cap was in force during the sync, not only after it: it had to be sampled mid-way.
    expect(samples.filter((s) => s.wire > 2 * MiB && s.wire < 14 * MiB).length).to.be.at.least(5);
    expect(await sha256File(path.join(dir, 'vm1.target.img'))).to.equal(await sha256File(path.join(dir, 'vm1.img')));
  });

  it('peers: [{ url, bandwidth: 4MiB/s }] is one bucket shared by the mirrors to that peer, and each gets a share', async () => {
    const { primary, t0 } = await start({ mirrors: ['a', 'b'], peerCap: '4MiB/s', allocated: 8 * MiB });
    // The sum of both mirrors stays under the one cap (twice the cap would fail this check).
    const samples = await watch(primary, t0, 4 * MiB, 2);
    expect(samples.filter((s) => s.wire > 2 * MiB && s.wire < 14 * MiB).length).to.be.at.least(5);
    // Neither mirror waits for the other to finish: FIFO turns give both progress part way through.
    expect(samples.some((s) => s.each.length === 2 && s.each.every((w) => w > 1 * MiB && w < 7 * MiB))).to.equal(true);
    for (const m of ['a', 'b']) expect(await sha256File(path.join(dir, `${m}.target.img`)), m).to.equal(await sha256File(path.join(dir, `${m}.img`)));
  });
});
