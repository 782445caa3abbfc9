import { expect } from 'chai';
import fc from 'fast-check';
import { TmError } from '../../src/errors.js';
import { BandwidthRegistry, TokenBucket, defaultBurst, throttle } from '../../src/wire/bandwidth.js';

const MiB = 1024 * 1024;

/** Let every pending promise continuation run. */
function flush(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}

/**
 * A fake clock for the bucket: `now` only moves in {@link advance}, which fires
 * the fake timers in due order and lets the continuations run after each one.
 * No wall-clock time is involved.
 */
class FakeClock {
  t = 0;
  private seq = 0;
  private timers: { due: number; seq: number; fire: () => void }[] = [];

  readonly now = (): number => this.t;

  readonly sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
    new Promise<void>((resolve) => {
      if (signal?.aborted) return resolve();
      const timer = {
        due: this.t + ms,
        seq: this.seq++,
        fire: () => {
          signal?.removeEventListener('abort', onAbort);
          resolve();
        },
      };
      const onAbort = () => {
        this.timers = this.timers.filter((x) => x !== timer);
        resolve();
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.timers.push(timer);
    });

  /** Pending fake timers (for "nothing left behind" checks). */
  get pending(): number {
    return this.timers.length;
  }

  /** Move time forward by `ms`, firing every timer due on the way, in order. */
  async advance(ms: number): Promise<void> {
    const end = this.t + ms;
    for (;;) {
      await flush();
      let next: (typeof this.timers)[number] | undefined;
      for (const x of this.timers) if (x.due <= end && (!next || x.due < next.due || (x.due === next.due && x.seq < next.seq))) next = x;
      if (!next) break;
      this.timers = this.timers.filter((x) => x !== next);
      this.t = Math.max(this.t, next.due);
      next.fire();
    }
    this.t = end;
    await flush();
  }
}

function bucket(clock: FakeClock, rate: number, burst?: number): TokenBucket {
  return new TokenBucket(rate, burst, { now: clock.now, sleep: clock.sleep });
}

/** Settle state of a promise, readable synchronously after a flush. */
function track(p: Promise<void>): { done: boolean; error: unknown } {
  const s: { done: boolean; error: unknown } = { done: false, error: undefined };
  p.then(
    () => (s.done = true),
    (e: unknown) => ((s.done = true), (s.error = e)),
  );
  return s;
}

/** Greedy senders: each takes `size` bytes again and again until stopped; bytes admitted by time `until` are counted. */
function greedy(take: (bytes: number) => Promise<void>, clock: FakeClock, sizes: number[], until: number): { admitted: number; stop: () => void } {
  const s = { admitted: 0, stopped: false, stop: () => (s.stopped = true) };
  void (async () => {
    for (let i = 0; !s.stopped; i++) {
      const n = sizes[i % sizes.length]!;
      await take(n);
      if (clock.t <= until) s.admitted += n;
    }
  })();
  return s;
}

describe('TokenBucket: bandwidth cap (fake clock)', () => {
  it('the default burst is a quarter second of traffic, at least 64 KiB', () => {
    expect(defaultBurst(100 * MiB)).to.equal(25 * MiB);
    expect(defaultBurst(1000)).to.equal(64 * 1024);
    expect(new TokenBucket(8 * MiB).burst).to.equal(2 * MiB);
  });

  it('rejects a rate or burst that is not positive with TM_ERR_CONFIG', () => {
    for (const [rate, burst] of [[0, 1], [-1, 1], [Number.NaN, 1], [Infinity, 1], [1, 0]] as const) {
      expect(() => new TokenBucket(rate, burst)).to.throw(TmError).with.property('code', 'TM_ERR_CONFIG');
    }
  });

  it('over a simulated 10 s a greedy sender gets rate * 10 + burst, within 1%', async () => {
    for (const sizes of [[16 * 1024], [4096, 65536, 1000, 300 * 1024, 7]]) {
      const clock = new FakeClock();
      const b = bucket(clock, MiB);
      const g = greedy((n) => b.take(n), clock, sizes, 10_000);
      await clock.advance(10_000);
      g.stop();
      const ideal = MiB * 10 + b.burst;
      expect(g.admitted).to.be.at.most(ideal);
      expect(Math.abs(g.admitted - ideal) / ideal).to.be.lessThan(0.01);
    }
  });

  it('starts full: a burst goes at once, then bytes wait for the rate', async () => {
    const clock = new FakeClock();
    const b = bucket(clock, 1000, 1000);
    await b.take(1000); // no time needed
    const s = track(b.take(100));
    await clock.advance(99);
    expect(s.done).to.equal(false);
    await clock.advance(1);
    expect(s.done).to.equal(true);
    expect(b.admitted).to.equal(1100);
  });

  it('serves waiters in arrival order: a small request never overtakes an earlier large one', async () => {
    const clock = new FakeClock();
    const b = bucket(clock, 1000, 1000);
    await b.take(1000);
    const order: string[] = [];
    const all = (
      [
        ['A', 500],
        ['B', 100],
        ['C', 800],
        ['D', 50],
      ] as const
    ).map(([name, n]) => b.take(n).then(() => order.push(name)));
    expect(b.waiting).to.equal(4);
    await clock.advance(400); // 400 tokens: enough for B, but A is first
    expect(order).to.deep.equal([]);
    await clock.advance(100);
    expect(order).to.deep.equal(['A']);
    await clock.advance(100);
    expect(order).to.deep.equal(['A', 'B']);
    await clock.advance(1000);
    await Promise.all(all);
    expect(order).to.deep.equal(['A', 'B', 'C', 'D']);
    expect(clock.t).to.equal(1600);
    expect(b.admitted).to.equal(1000 + 1450);
  });

  it('a later request queues behind waiters even when tokens are there', async () => {
    const clock = new FakeClock();
    const b = bucket(clock, 1000, 1000);
    await b.take(900);
    const order: string[] = [];
    const big = b.take(600).then(() => order.push('big'));
    await clock.advance(100); // 200 tokens, big still needs 400 more
    const small = b.take(10).then(() => order.push('small'));
    await clock.advance(400);
    expect(order).to.deep.equal(['big']); // at 500 ms; the 600 tokens went to big
    await clock.advance(9);
    expect(order).to.deep.equal(['big']);
    await clock.advance(1);
    await Promise.all([big, small]);
    expect(order).to.deep.equal(['big', 'small']);
  });

  it('two mirrors sharing a peer bucket each get about half', async () => {
    const clock = new FakeClock();
    const reg = new BandwidthRegistry({ now: clock.now, sleep: clock.sleep });
    const peerLimit = { rate: 2 * MiB };
    const a = reg.bucketsFor({ mirror: 'a', mirrorLimit: { rate: 10 * MiB }, peer: 'h:1', peerLimit });
    const b = reg.bucketsFor({ mirror: 'b', mirrorLimit: { rate: 10 * MiB }, peer: 'h:1', peerLimit });
    expect(a[1]).to.equal(b[1]); // one shared peer bucket
    expect(a[0]).to.not.equal(b[0]);
    const ga = greedy((n) => throttle(a, n), clock, [64 * 1024], 10_000);
    const gb = greedy((n) => throttle(b, n), clock, [64 * 1024], 10_000);
    await clock.advance(10_000);
    ga.stop();
    gb.stop();
    const total = ga.admitted + gb.admitted;
    const ideal = 2 * MiB * 10 + defaultBurst(2 * MiB);
    expect(total).to.be.at.most(ideal);
    expect(Math.abs(total - ideal) / ideal).to.be.lessThan(0.01);
    expect(Math.abs(ga.admitted - gb.admitted) / total).to.be.lessThan(0.02);
  });

  it('a mirror limit below its share holds that mirror; the other takes the rest of the peer', async () => {
    const clock = new FakeClock();
    const reg = new BandwidthRegistry({ now: clock.now, sleep: clock.sleep });
    const peerLimit = { rate: 4 * MiB, burst: MiB };
    const slow = reg.bucketsFor({ mirror: 'slow', mirrorLimit: { rate: MiB, burst: 256 * 1024 }, peer: 'p', peerLimit });
    const fast = reg.bucketsFor({ mirror: 'fast', peer: 'p', peerLimit });
    expect(fast).to.have.length(1);
    const gs = greedy((n) => throttle(slow, n), clock, [32 * 1024], 10_000);
    const gf = greedy((n) => throttle(fast, n), clock, [32 * 1024], 10_000);
    await clock.advance(10_000);
    gs.stop();
    gf.stop();
    expect(Math.abs(gs.admitted - (10 * MiB + 256 * 1024)) / (10 * MiB)).to.be.lessThan(0.01);
    const peerIdeal = 40 * MiB + MiB;
    expect(Math.abs(gs.admitted + gf.admitted - peerIdeal) / peerIdeal).to.be.lessThan(0.01);
  });

  it('abort rejects with TM_ERR_ABORTED, takes nothing, and the next waiter moves up', async () => {
    const clock = new FakeClock();
    const b = bucket(clock, 1000, 1000);
    await b.take(1000);
    const order: string[] = [];
    const ac = new AbortController();
    const pa = b.take(500).then(() => order.push('A'));
    const pb = track(b.take(300, ac.signal));
    const pc = b.take(200).then(() => order.push('C'));
    await clock.advance(100);
    ac.abort();
    await flush();
    expect(pb.done).to.equal(true);
    expect(pb.error).to.be.instanceOf(TmError).with.property('code', 'TM_ERR_ABORTED');
    expect(b.waiting).to.equal(2);
    await clock.advance(600);
    await Promise.all([pa, pc]);
    expect(order).to.deep.equal(['A', 'C']);
    expect(clock.t).to.equal(700); // 500 + 200: the aborted 300 was never charged
    expect(b.admitted).to.equal(1700);
    expect(b.available).to.equal(0);
  });

  it('aborting the first waiter lets the next one go with the tokens accrued meanwhile', async () => {
    const clock = new FakeClock();
    const b = bucket(clock, 1000, 1000);
    await b.take(1000);
    const ac = new AbortController();
    const head = track(b.take(800, ac.signal));
    const next = track(b.take(100));
    await clock.advance(300);
    expect(next.done).to.equal(false);
    ac.abort(new Error('shutdown'));
    await flush();
    await flush();
    expect((head.error as TmError).code).to.equal('TM_ERR_ABORTED');
    expect((head.error as TmError).message).to.contain('shutdown');
    expect(next.done).to.equal(true); // at once, no more time needed
    expect(next.error).to.equal(undefined);
    expect(clock.t).to.equal(300);
    expect(b.available).to.equal(200);
    expect(b.waiting).to.equal(0);
    expect(clock.pending).to.equal(0);
  });

  it('an already aborted signal rejects at once without touching the bucket', async () => {
    const clock = new FakeClock();
    const b = bucket(clock, 1000, 1000);
    const ac = new AbortController();
    ac.abort();
    const s = track(b.take(10, ac.signal));
    await flush();
    expect((s.error as TmError).code).to.equal('TM_ERR_ABORTED');
    expect(b.available).to.equal(1000);
  });

  it('throttle: aborted on the second bucket, the first gets its tokens back', async () => {
    const clock = new FakeClock();
    const mirror = bucket(clock, 1000, 1000);
    const peer = bucket(clock, 1000, 1000);
    await peer.take(1000);
    const ac = new AbortController();
    const s = track(throttle([mirror, undefined, peer], 400, ac.signal));
    await flush();
    expect(mirror.available).to.equal(600);
    ac.abort();
    await flush();
    await flush();
    expect((s.error as TmError).code).to.equal('TM_ERR_ABORTED');
    expect(mirror.available).to.equal(1000);
    expect(mirror.admitted).to.equal(0);
    expect(peer.waiting).to.equal(0);
  });

  it('a request larger than the burst completes, after size / rate from empty', async () => {
    const clock = new FakeClock();
    const b = bucket(clock, 1000, 1000);
    const s = track(b.take(5000)); // 1000 in the bucket, 4000 to accrue
    await clock.advance(3999);
    expect(s.done).to.equal(false);
    await clock.advance(1);
    expect(s.done).to.equal(true);
    expect(s.error).to.equal(undefined);
    // The bucket is empty after it: the next bytes wait for the rate.
    const t = track(b.take(1000));
    await clock.advance(999);
    expect(t.done).to.equal(false);
    await clock.advance(1);
    expect(t.done).to.equal(true);
  });

  it('setRate applies to waiters already queued', async () => {
    const clock = new FakeClock();
    const b = bucket(clock, 1000, 1000);
    await b.take(1000);
    const s = track(b.take(1000));
    await clock.advance(100);
    b.setRate(10_000, 1000);
    await clock.advance(89);
    expect(s.done).to.equal(false);
    await clock.advance(1); // 100 at the old rate + 900 at the new one
    expect(s.done).to.equal(true);
  });

  it('the registry returns one bucket per key, updates a changed limit, none without a limit', () => {
    const reg = new BandwidthRegistry();
    const p1 = reg.peer('host:7000', { rate: MiB });
    expect(reg.peer('host:7000', { rate: MiB })).to.equal(p1);
    expect(reg.peer('other:7000', { rate: MiB })).to.not.equal(p1);
    expect(reg.peer('host:7000', { rate: 2 * MiB, burst: 4096 })).to.equal(p1);
    expect(p1!.rate).to.equal(2 * MiB);
    expect(p1!.burst).to.equal(4096);
    expect(reg.mirror('vm1', undefined)).to.equal(undefined);
    expect(reg.bucketsFor({ mirror: 'vm1', peer: 'host:7000' })).to.deep.equal([]);
    reg.forgetPeer('host:7000');
    expect(reg.peer('host:7000', { rate: MiB })).to.not.equal(p1);
  });

  it('property: admitted bytes never exceed rate * t + burst; every request not aborted completes, in order', async () => {
    const request = fc.record({
      bytes: fc.integer({ min: 1, max: 3000 }),
      gapMs: fc.integer({ min: 0, max: 500 }),
      abortAfterMs: fc.option(fc.integer({ min: 0, max: 3000 }), { nil: undefined }),
    });
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 100, max: 100_000 }),
        fc.integer({ min: 1, max: 2000 }),
        fc.array(request, { minLength: 1, maxLength: 25 }),
        async (rate, burst, requests) => {
          const clock = new FakeClock();
          const b = bucket(clock, rate, burst);
          const admissions: { t: number; bytes: number; i: number }[] = [];
          const outcomes: ('ok' | 'aborted' | 'other')[] = [];
          const settled: Promise<void>[] = [];
          let span = 0;
          for (const [i, r] of requests.entries()) {
            await clock.advance(r.gapMs);
            const ac = new AbortController();
            if (r.abortAfterMs !== undefined) void clock.sleep(r.abortAfterMs).then(() => ac.abort());
            settled.push(
              b.take(r.bytes, ac.signal).then(
                () => {
                  admissions.push({ t: clock.t, bytes: r.bytes, i });
                  outcomes[i] = 'ok';
                },
                (e: unknown) => {
                  outcomes[i] = e instanceof TmError && e.code === 'TM_ERR_ABORTED' ? 'aborted' : 'other';
                },
              ),
            );
            span += r.gapMs + (r.bytes * 1000) / rate + 1;
          }
          await clock.advance(Math.ceil(span) + 4000);
          await Promise.all(settled);
          // Every request settled: admitted, or aborted (only when it had an abort).
          for (const [i, r] of requests.entries()) {
            if (r.abortAfterMs === undefined) expect(outcomes[i]).to.equal('ok');
            else expect(outcomes[i]).to.be.oneOf(['ok', 'aborted']);
          }
          // Never more than rate * t + burst by any time t.
          let sum = 0;
          for (const a of admissions) {
            sum += a.bytes;
            expect(sum).to.be.at.most((rate * a.t) / 1000 + burst + 1e-6 * sum);
          }
          // FIFO: admitted in the order they were asked for.
          expect(admissions.map((a) => a.i)).to.deep.equal([...admissions.map((a) => a.i)].sort((x, y) => x - y));
          expect(b.waiting).to.equal(0);
        },
      ),
      { numRuns: 150 },
    );
  });
});
