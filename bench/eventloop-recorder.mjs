// Preloaded into each daemon by bench/eventloop.ts (node --import): records
// the event-loop delay of the whole run in one histogram that no scrape
// resets (prom-client resets its own at every /metrics), at prom-client's
// 10 ms resolution, and every stall over 20 ms with its time; writes them as
// JSON to $TM_ELD_DIR/eld.<pid>.json when the process exits. SIGUSR2 starts
// the record afresh (the bench sends it when the sync starts, so that the
// daemon's own start is not counted). A bench instrument only: the daemon
// never loads it.
import { writeFileSync } from 'node:fs';
import { monitorEventLoopDelay } from 'node:perf_hooks';

const RESOLUTION_MS = 10;
const dir = process.env.TM_ELD_DIR;
if (dir) {
  const h = monitorEventLoopDelay({ resolution: RESOLUTION_MS });
  h.enable();
  const stalls = [];
  let last = performance.now();
  const t = setInterval(() => {
    const now = performance.now();
    const late = now - last - RESOLUTION_MS;
    if (late > 20) stalls.push({ atMs: Math.round(last), lateMs: Math.round(late * 10) / 10 });
    last = now;
  }, RESOLUTION_MS);
  t.unref();
  process.on('SIGUSR2', () => {
    h.reset();
    stalls.length = 0;
    last = performance.now();
  });
  process.on('exit', () => {
    h.disable();
    const ms = (ns) => ns / 1e6;
    const pct = Object.fromEntries([50, 90, 99, 99.9].map((p) => [`p${p}`, ms(h.percentile(p))]));
    writeFileSync(
      `${dir}/eld.${process.pid}.json`,
      JSON.stringify({ resolutionMs: RESOLUTION_MS, count: h.count, min: ms(h.min), max: ms(h.max), mean: ms(h.mean), ...pct, stalls, startedAt: Date.now() - performance.now() }),
    );
  });
}
