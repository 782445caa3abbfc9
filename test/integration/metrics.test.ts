import { expect } from 'chai';
import { promises as fsp } from 'node:fs';
import * as http from 'node:http';
import { parse, stringify } from 'yaml';
import { controlGet, type DaemonStatus } from '../../src/daemon/control.js';
import { createSampleVolume } from '../../src/util/sample.js';
import { freePort } from '../helpers/pair-config.js';
import { Pair } from '../helpers/pair.js';
import { key, parseExposition } from '../helpers/prometheus.js';

const MiB = 1024 * 1024;

/** Add a top-level `metrics: { host, port }` to a config file written by the Pair helper. */
async function addMetricsListener(configFile: string, port: number): Promise<void> {
  const c = parse(await fsp.readFile(configFile, 'utf8')) as Record<string, unknown>;
  c.metrics = { host: '127.0.0.1', port };
  await fsp.writeFile(configFile, stringify(c));
}

function httpGet(port: number, urlPath: string): Promise<{ statusCode: number; contentType: string; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, path: urlPath, timeout: 5000 }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ statusCode: res.statusCode ?? 0, contentType: String(res.headers['content-type'] ?? ''), body: Buffer.concat(chunks).toString('utf8') }));
      })
      .on('error', reject);
  });
}

describe('integration: metrics over the control socket and TCP (two daemons on loopback)', function () {
  this.timeout(120_000);
  let pair: Pair;
  afterEach(async () => {
    await pair?.cleanup();
  });

  it('GET /metrics on both listeners matches GET /status: state, committed generation, payload and wire bytes, cycles, errors', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 32 * MiB, allocated: 6 * MiB, extents: 5 });
    await pair.writeConfigs({ interval: '500ms' });
    const primaryPort = await freePort();
    const secondaryPort = await freePort();
    await addMetricsListener(pair.cfg.primary, primaryPort);
    await addMetricsListener(pair.cfg.secondary, secondaryPort);
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    await pair.waitInSync(1);

    const before = await pair.primary!.status();
    expect(before.metrics).to.deep.equal({ host: '127.0.0.1', port: primaryPort });
    const overUnix = await controlGet(pair.cfg.primaryState, '/metrics');
    const overTcp = await httpGet(primaryPort, '/metrics');
    const after = await pair.primary!.status();
    for (const r of [overUnix, overTcp]) {
      expect(r.statusCode).to.equal(200);
      expect(r.contentType).to.contain('text/plain');
    }
    const l = { mirror: pair.mirror, role: 'primary' };
    const b = before.mirrors[0]!;
    const a = after.mirrors[0]!;
    // Nothing changes on the source, so the counters are the same before and after; bracket them anyway.
    for (const text of [overUnix.body, overTcp.body]) {
      const m = parseExposition(text);
      expect(m.get(key('thinmirror_build_info', { node: 'site-a', version: before.version }))).to.equal(1);
      expect(m.get(key('thinmirror_mirror_state', { ...l, state: 'in-sync' }))).to.equal(1);
      expect(m.get(key('thinmirror_mirror_state', { ...l, state: 'initial-sync' }))).to.equal(0);
      expect(m.get(key('thinmirror_mirror_committed_generation', l))).to.be.within(b.committedGeneration, a.committedGeneration);
      expect(m.get(key('thinmirror_mirror_generation', l))).to.be.within(b.generation, a.generation);
      expect(m.get(key('thinmirror_mirror_payload_bytes_total', l))).to.be.within(b.sentBytes, a.sentBytes);
      expect(m.get(key('thinmirror_mirror_wire_bytes_total', l))).to.be.within(b.wireBytes, a.wireBytes);
      expect(m.get(key('thinmirror_mirror_allocated_bytes', l))).to.be.within(Math.min(b.allocatedBytes, a.allocatedBytes), Math.max(b.allocatedBytes, a.allocatedBytes));
      expect(m.get(key('thinmirror_mirror_dirty_bytes', l))).to.equal(0);
      // The replica's age (issue 15): present and positive once a generation is committed.
      expect(m.get(key('thinmirror_mirror_lag_seconds', l))).to.be.greaterThan(0);
      // The initial sync is a cycle with a report; the daemon has seen it.
      expect(m.get(key('thinmirror_mirror_cycles_total', l))).to.be.at.least(1);
      expect(m.get(key('thinmirror_mirror_last_cycle_generation', l))).to.equal(a.lastCycle!.generation);
      expect(m.get(key('thinmirror_mirror_last_cycle_duration_seconds', l))).to.equal(a.lastCycle!.durationSeconds);
      expect(m.has('process_cpu_user_seconds_total')).to.equal(true);
      // Issue 14 §4: the event-loop delay of the daemon, from prom-client's default metrics.
      expect(m.get('nodejs_eventloop_lag_p99_seconds')).to.be.a('number');
    }
    expect(b.sentBytes).to.equal(a.sentBytes);
    expect(a.sentBytes).to.be.at.least(6 * MiB);
    expect(a.rateBytesPerSecond, 'no generation in flight').to.equal(null);

    // The secondary: payload applied, over its own TCP listener; 404 elsewhere.
    const sec = await pair.secondary!.status();
    const sm = parseExposition((await httpGet(secondaryPort, '/metrics')).body);
    const sl = { mirror: pair.mirror, role: 'secondary' };
    expect(sm.get(key('thinmirror_mirror_applied_bytes_total', sl))).to.equal(sec.mirrors[0]!.appliedBytes);
    expect(sm.get(key('thinmirror_mirror_applied_bytes_total', sl))).to.equal(a.sentBytes);
    expect(sm.get(key('thinmirror_mirror_committed_generation', sl))).to.equal(sec.mirrors[0]!.committedGeneration);
    expect((await httpGet(secondaryPort, '/status')).statusCode, 'the TCP listener serves only /metrics').to.equal(404);

    // Stop the secondary: the primary reports an error; errors_total has it under its code.
    await pair.secondary!.stop();
    const failing: DaemonStatus = await pair.primary!.waitFor((s) => s.mirrors[0]!.error !== null, 60_000, 'the primary to report the lost secondary');
    const code = failing.mirrors[0]!.error!.code;
    const em = parseExposition((await controlGet(pair.cfg.primaryState, '/metrics')).body);
    expect(em.get(key('thinmirror_errors_total', { ...l, code }))).to.be.at.least(1);
  });
});
