import { expect } from 'chai';
import { Coalesced } from '../../src/util/coalesce.js';

const tick = () => new Promise((r) => setTimeout(r, 1));

describe('Coalesced (util/coalesce): one run at a time, later requests coalesced', () => {
  it('requests during a run give exactly one more run, never two at once', async () => {
    let running = 0;
    let maxRunning = 0;
    let runs = 0;
    let seen = 0;
    let value = 0;
    const c = new Coalesced(async () => {
      running++;
      maxRunning = Math.max(maxRunning, running);
      const v = value; // what this run persists: the latest value when it starts
      await tick();
      seen = v;
      runs++;
      running--;
    });
    value = 1;
    c.request();
    for (let i = 2; i <= 5; i++) {
      value = i;
      c.request(); // while the first run goes: coalesced into one more
    }
    await c.settled();
    expect(runs).to.equal(2);
    expect(maxRunning).to.equal(1);
    expect(seen, 'the last run saw the last request').to.equal(5);
    expect(c.busy).to.equal(false);
  });

  it('a failed run is reported once, later requests are ignored and settled() rejects with it', async () => {
    const errors: unknown[] = [];
    let runs = 0;
    const c = new Coalesced(
      async () => {
        runs++;
        await tick();
        throw new Error('disk full');
      },
      (e) => errors.push(e),
    );
    c.request();
    c.request();
    const err = await c.settled().catch((e) => e);
    expect((err as Error).message).to.equal('disk full');
    expect(errors).to.have.length(1);
    expect(runs).to.equal(1);
    c.request();
    expect(c.busy).to.equal(false);
    expect((c.error as Error).message).to.equal('disk full');
  });
});
