import { expect } from 'chai';
import { MirrorMetrics, progressRate, RATE_WINDOW_SECONDS } from '../../src/daemon/metrics.js';
import { blankStatus, type MirrorStatus } from '../../src/mirror/status.js';
import { key, parseExposition } from '../helpers/prometheus.js';

function baseStatus(name: string, role: MirrorStatus['role']): MirrorStatus {
  return {
    ...blankStatus({
      name,
      role,
      state: role === 'primary' ? 'connecting' : 'waiting',
      volume: `/v/${name}.img`,
      peer: null,
      trackingMode: role === 'primary' ? 'scan' : null,
      chunkSize: 65536,
    }),
    volumeBytes: 1 << 30,
    allocatedBytes: 1 << 28,
  };
}

/** A fake mirror: status() returns whatever the test set last. */
class FakeMirror {
  s: MirrorStatus;
  constructor(name: string, role: MirrorStatus['role']) {
    this.s = baseStatus(name, role);
  }
  set(p: Partial<MirrorStatus>): void {
    this.s = { ...this.s, ...p };
  }
  status(): MirrorStatus {
    return structuredClone(this.s);
  }
}

describe('metrics: Prometheus exposition of mirror status (fake mirrors)', () => {
  let clock: number;
  let a: FakeMirror;
  let b: FakeMirror;
  let metrics: MirrorMetrics;
  const pa = { mirror: 'vm1', role: 'primary' };
  const sb = { mirror: 'db1', role: 'secondary' };
  const scrape = async () => parseExposition(await metrics.scrape());

  beforeEach(() => {
    clock = 1_000_000;
    a = new FakeMirror('vm1', 'primary');
    b = new FakeMirror('db1', 'secondary');
    metrics = new MirrorMetrics(() => [a, b], { node: 'site-a', version: '9.9.9', now: () => clock });
  });

  it('serves text on its own registry, with build info and the default process metrics', async () => {
    const text = await metrics.scrape();
    expect(metrics.contentType).to.contain('text/plain');
    const m = parseExposition(text);
    expect(m.get(key('thinmirror_build_info', { node: 'site-a', version: '9.9.9' }))).to.equal(1);
    expect([...m.keys()].some((k) => k.startsWith('process_cpu_user_seconds_total'))).to.equal(true);
    // Not the global registry: a second instance registers the same names without a clash.
    const other = new MirrorMetrics(() => [], { node: 'x', version: '0', defaultMetrics: true });
    expect(await other.scrape()).to.contain('thinmirror_build_info');
  });

  it('state: 1 for the current state, 0 for every other state of the role', async () => {
    a.set({ state: 'initial-sync' });
    b.set({ state: 'receiving' });
    let m = await scrape();
    for (const st of ['connecting', 'initial-sync', 'syncing', 'in-sync', 'error', 'stopped']) {
      expect(m.get(key('thinmirror_mirror_state', { ...pa, state: st })), st).to.equal(st === 'initial-sync' ? 1 : 0);
    }
    for (const st of ['waiting', 'receiving', 'idle', 'error', 'stopped']) {
      expect(m.get(key('thinmirror_mirror_state', { ...sb, state: st })), st).to.equal(st === 'receiving' ? 1 : 0);
    }
    a.set({ state: 'in-sync' });
    m = await scrape();
    expect(m.get(key('thinmirror_mirror_state', { ...pa, state: 'initial-sync' }))).to.equal(0);
    expect(m.get(key('thinmirror_mirror_state', { ...pa, state: 'in-sync' }))).to.equal(1);
  });

  it('gauges follow the status; lag and progress are absent while unknown', async () => {
    let m = await scrape();
    expect(m.has(key('thinmirror_mirror_lag_seconds', pa))).to.equal(false);
    expect(m.has(key('thinmirror_mirror_progress_done_bytes', pa))).to.equal(false);
    a.set({ lagSeconds: 12.5, dirtyBytes: 3 << 20, generation: 7, committedGeneration: 6, progress: { generation: 7, doneBytes: 100, totalBytes: 400 } });
    m = await scrape();
    expect(m.get(key('thinmirror_mirror_lag_seconds', pa))).to.equal(12.5);
    expect(m.get(key('thinmirror_mirror_dirty_bytes', pa))).to.equal(3 << 20);
    expect(m.get(key('thinmirror_mirror_generation', pa))).to.equal(7);
    expect(m.get(key('thinmirror_mirror_committed_generation', pa))).to.equal(6);
    expect(m.get(key('thinmirror_mirror_volume_bytes', pa))).to.equal(1 << 30);
    expect(m.get(key('thinmirror_mirror_allocated_bytes', pa))).to.equal(1 << 28);
    expect(m.get(key('thinmirror_mirror_progress_done_bytes', pa))).to.equal(100);
    expect(m.get(key('thinmirror_mirror_progress_total_bytes', pa))).to.equal(400);
    a.set({ lagSeconds: null, progress: null });
    m = await scrape();
    expect(m.has(key('thinmirror_mirror_lag_seconds', pa))).to.equal(false);
    expect(m.has(key('thinmirror_mirror_progress_total_bytes', pa))).to.equal(false);
  });

  it('payload (sent), applied and wire totals equal the status lifetime counters; a total that went down restarts the series', async () => {
    a.set({ sentBytes: 1000, wireBytes: 700 });
    b.set({ appliedBytes: 50, wireBytes: 60 });
    let m = await scrape();
    expect(m.get(key('thinmirror_mirror_payload_bytes_total', pa))).to.equal(1000);
    expect(m.get(key('thinmirror_mirror_applied_bytes_total', pa)), 'a primary applies nothing').to.equal(0);
    expect(m.get(key('thinmirror_mirror_wire_bytes_total', pa))).to.equal(700);
    expect(m.get(key('thinmirror_mirror_applied_bytes_total', sb))).to.equal(50);
    expect(m.get(key('thinmirror_mirror_payload_bytes_total', sb)), 'what a secondary applied is not counted as sent').to.equal(0);
    expect(m.get(key('thinmirror_mirror_wire_bytes_total', sb))).to.equal(60);
    a.set({ sentBytes: 5000, wireBytes: 2100 });
    b.set({ appliedBytes: 4000 });
    await metrics.observe(); // the once-a-second poll in between
    a.set({ sentBytes: 6000, wireBytes: 2500 });
    b.set({ appliedBytes: 5500 });
    m = await scrape();
    expect(m.get(key('thinmirror_mirror_payload_bytes_total', pa))).to.equal(6000);
    expect(m.get(key('thinmirror_mirror_wire_bytes_total', pa))).to.equal(2500);
    expect(m.get(key('thinmirror_mirror_applied_bytes_total', sb))).to.equal(5500);
    expect(m.get(key('thinmirror_mirror_payload_bytes_total', sb))).to.equal(0);
    a.set({ sentBytes: 10 });
    b.set({ appliedBytes: 20 });
    m = await scrape();
    expect(m.get(key('thinmirror_mirror_payload_bytes_total', pa))).to.equal(10);
    expect(m.get(key('thinmirror_mirror_applied_bytes_total', sb))).to.equal(20);
  });

  it('cycles: one per distinct lastCycle seen, durations summed, last cycle gauges', async () => {
    let m = await scrape();
    expect(m.get(key('thinmirror_mirror_cycles_total', pa))).to.equal(0);
    a.set({ lastCycle: { generation: 1, changedBytes: 4096, readBytes: 4096, wireBytes: 900, durationSeconds: 2.5 } });
    await metrics.observe();
    await metrics.observe(); // the same report seen again is not another cycle
    m = await scrape();
    expect(m.get(key('thinmirror_mirror_cycles_total', pa))).to.equal(1);
    a.set({ lastCycle: { generation: 2, changedBytes: 8192, readBytes: 8192, wireBytes: 1200, durationSeconds: 0.5 } });
    m = await scrape();
    expect(m.get(key('thinmirror_mirror_cycles_total', pa))).to.equal(2);
    expect(m.get(key('thinmirror_mirror_cycle_duration_seconds_total', pa))).to.equal(3);
    expect(m.get(key('thinmirror_mirror_last_cycle_duration_seconds', pa))).to.equal(0.5);
    expect(m.get(key('thinmirror_mirror_last_cycle_generation', pa))).to.equal(2);
    expect(m.get(key('thinmirror_mirror_last_cycle_changed_bytes', pa))).to.equal(8192);
    expect(m.get(key('thinmirror_mirror_last_cycle_wire_bytes', pa))).to.equal(1200);
    expect(m.has(key('thinmirror_mirror_last_cycle_step_seconds', { ...pa, step: 'snapshot' })), 'no steps reported: no series').to.equal(false);
    const steps = { snapshot: 0.25, fiemap: 0.5, diff: 0.125, save: 0.0625, read: 1, send: 2, apply: 0.75, commit: 0.375 };
    a.set({ lastCycle: { generation: 3, changedBytes: 8192, readBytes: 8192, wireBytes: 1200, durationSeconds: 5, steps } });
    m = await scrape();
    for (const [step, v] of Object.entries(steps)) expect(m.get(key('thinmirror_mirror_last_cycle_step_seconds', { ...pa, step })), step).to.equal(v);
  });

  it('errors_total counts each new error (code or message) by code; the error gauge shows the current one', async () => {
    const err = (code: string, message: string) => ({ code, message }) as MirrorStatus['error'];
    a.set({ error: err('TM_ERR_CONNECTION', 'refused') });
    await metrics.observe();
    await metrics.observe(); // unchanged: not counted again
    a.set({ error: err('TM_ERR_CONNECTION', 'reset by peer') });
    await metrics.observe();
    a.set({ error: null });
    let m = await scrape();
    expect(m.get(key('thinmirror_errors_total', { ...pa, code: 'TM_ERR_CONNECTION' }))).to.equal(2);
    expect([...m.keys()].some((k) => k.startsWith('thinmirror_mirror_error{'))).to.equal(false);
    a.set({ error: err('TM_ERR_CONNECTION', 'reset by peer') }); // back after a clear: a new occurrence
    await metrics.observe();
    a.set({ error: err('TM_ERR_VOLUME_IO', 'EIO') });
    m = await scrape();
    expect(m.get(key('thinmirror_errors_total', { ...pa, code: 'TM_ERR_CONNECTION' }))).to.equal(3);
    expect(m.get(key('thinmirror_errors_total', { ...pa, code: 'TM_ERR_VOLUME_IO' }))).to.equal(1);
    expect(m.get(key('thinmirror_mirror_error', { ...pa, code: 'TM_ERR_VOLUME_IO' }))).to.equal(1);
    expect(m.has(key('thinmirror_mirror_error', { ...pa, code: 'TM_ERR_CONNECTION' }))).to.equal(false);
    expect(m.has(key('thinmirror_errors_total', { ...sb, code: 'TM_ERR_CONNECTION' }))).to.equal(false);
  });

  it('progress rate: bytes per second of the generation in flight over the window, reset by a new generation', async () => {
    const MB = 1_000_000;
    a.set({ progress: { generation: 1, doneBytes: 0, totalBytes: 1000 * MB } });
    await metrics.observe();
    expect(metrics.rateOf('vm1')).to.equal(null); // one sample: nothing measured yet
    clock += 1000;
    a.set({ progress: { generation: 1, doneBytes: 100 * MB, totalBytes: 1000 * MB } });
    let m = await scrape();
    expect(metrics.rateOf('vm1')).to.equal(100 * MB);
    expect(m.get(key('thinmirror_mirror_progress_rate_bytes_per_second', pa))).to.equal(100 * MB);
    // Slower later: only the last RATE_WINDOW_SECONDS count.
    for (let i = 0; i < RATE_WINDOW_SECONDS + 5; i++) {
      clock += 1000;
      a.set({ progress: { generation: 1, doneBytes: 100 * MB + (i + 1) * 10 * MB, totalBytes: 1000 * MB } });
      await metrics.observe();
    }
    expect(metrics.rateOf('vm1')).to.equal(10 * MB);
    a.set({ progress: { generation: 2, doneBytes: 0, totalBytes: 5 * MB } });
    await metrics.observe();
    expect(metrics.rateOf('vm1')).to.equal(null);
    a.set({ progress: null });
    m = await scrape();
    expect(m.has(key('thinmirror_mirror_progress_rate_bytes_per_second', pa))).to.equal(false);
    expect(progressRate([{ t: 0, generation: 1, done: 0 }, { t: 400, generation: 1, done: 10 }])).to.equal(null);
  });

  it('drills: a count per secondary, age and generation per drill; the series of a stopped drill go; nothing on a primary', async () => {
    b.set({ drills: [{ name: 'd1', path: '/v/db1.img.drill-d1', generation: 7, ageSeconds: 12.5 }, { name: 'd2', path: '/v/db1.img.drill-d2', generation: 9, ageSeconds: 1 }] });
    let m = await scrape();
    expect(m.get(key('thinmirror_mirror_drills', sb))).to.equal(2);
    expect(m.get(key('thinmirror_drill_age_seconds', { ...sb, drill: 'd1' }))).to.equal(12.5);
    expect(m.get(key('thinmirror_drill_generation', { ...sb, drill: 'd2' }))).to.equal(9);
    expect(m.has(key('thinmirror_mirror_drills', pa))).to.equal(false);
    b.set({ drills: [{ name: 'd2', path: '/v/db1.img.drill-d2', generation: 9, ageSeconds: 2 }] });
    m = await scrape();
    expect(m.get(key('thinmirror_mirror_drills', sb))).to.equal(1);
    expect(m.has(key('thinmirror_drill_age_seconds', { ...sb, drill: 'd1' }))).to.equal(false);
    expect(m.has(key('thinmirror_drill_generation', { ...sb, drill: 'd1' }))).to.equal(false);
    expect(m.get(key('thinmirror_drill_age_seconds', { ...sb, drill: 'd2' }))).to.equal(2);
    await metrics.forget('db1');
    m = parseExposition(await metrics.registry.metrics());
    expect(m.has(key('thinmirror_drill_age_seconds', { ...sb, drill: 'd2' }))).to.equal(false);
  });

  it('observations run one at a time, so a slow status never applies after a newer one', async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let calls = 0;
    const slow = {
      async status(): Promise<MirrorStatus> {
        calls++;
        const s = { ...baseStatus('slow', 'primary'), sentBytes: calls * 100 };
        if (calls === 1) await gate;
        return s;
      },
    };
    const mm = new MirrorMetrics(() => [slow], { node: 'n', version: 'v', defaultMetrics: false });
    const first = mm.observe();
    const second = mm.scrape();
    await new Promise((r) => setImmediate(r));
    expect(calls, 'the scrape waits for the observation in progress').to.equal(1);
    release();
    await first;
    const m = parseExposition(await second);
    expect(calls).to.equal(2);
    expect(m.get(key('thinmirror_mirror_payload_bytes_total', { mirror: 'slow', role: 'primary' }))).to.equal(200);
  });
});
