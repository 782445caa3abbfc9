import { expect } from 'chai';
import { setImmediate as turn } from 'node:timers/promises';
import { ErrorCodes, TmError } from '../../src/errors.js';
import { encode } from '../../src/wire/codec.js';
import { memorySessionPair } from '../../src/wire/memory.js';
import type { Message } from '../../src/wire/messages.js';
import type { Session } from '../../src/wire/session.js';
import { rejection } from '../helpers/rejection.js';

const commit = (generation: number): Message => ({ type: 'commit', generation });

/** The generations of the next `n` messages (commit frames) a session hands out. */
async function generations(s: Session, n: number): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const m = await s.next(2000);
    if (m.type !== 'commit') expect.fail(`expected a commit, got ${m.type}`);
    out.push(m.generation);
  }
  return out;
}

describe('memory session pair: two Sessions joined in memory', () => {
  it('delivers frames in order, both ways, never inside send()', async () => {
    const { a, b, frames } = memorySessionPair();
    for (let g = 1; g <= 50; g++) a.send(commit(g));
    b.send(commit(7));
    // Nothing has arrived yet: the frames wait in the link.
    expect(a.bufferedAmount).to.be.greaterThan(0);
    expect(b.counters.framesIn).to.equal(0);
    expect(await generations(b, 50)).to.deep.equal(Array.from({ length: 50 }, (_, i) => i + 1));
    expect(await generations(a, 1)).to.deep.equal([7]);
    expect(a.bufferedAmount).to.equal(0);
    expect(frames).to.deep.equal({ a: 50, b: 1 });
    expect(b.counters.bytesIn).to.equal(a.counters.bytesOut);
    a.close();
    b.close();
  });

  it('a side that stops reading pauses its channel: the sender sees bufferedAmount grow, then drain', async () => {
    const { a, b } = memorySessionPair({ maxQueued: 4 });
    for (let g = 1; g <= 20; g++) a.send(commit(g));
    const frameBytes = a.bufferedAmount / 20;
    for (let i = 0; i < 5; i++) await turn();
    // b queued 4 messages and paused: the other 16 frames stay in flight.
    expect(b.counters.framesIn).to.equal(4);
    expect(a.bufferedAmount).to.equal(16 * frameBytes);
    expect(await generations(b, 3)).to.deep.equal([1, 2, 3]);
    // Below half of maxQueued: resumed, and the rest arrives in order.
    for (let i = 0; i < 5; i++) await turn();
    expect(b.counters.framesIn).to.be.greaterThan(4);
    expect(await generations(b, 17)).to.deep.equal(Array.from({ length: 17 }, (_, i) => i + 4));
    expect(a.bufferedAmount).to.equal(0);
  });

  for (const from of ['a', 'b'] as const) {
    it(`a cut at frame index 3 sent from ${from}: frames 0..2 arrive, then both sides end with TM_ERR_CONNECTION (1006)`, async () => {
      const seen: number[] = [];
      const pair = memorySessionPair({
        onFrame: (side, index) => {
          if (side === from) seen.push(index);
          return side === from && index === 3 ? 'cut' : 'pass';
        },
      });
      const [sender, receiver] = from === 'a' ? [pair.a, pair.b] : [pair.b, pair.a];
      for (let g = 1; g <= 6; g++) sender.send(commit(g));
      // Sends after the cut go nowhere, as on a closed WebSocket.
      expect(seen).to.deep.equal([0, 1, 2, 3]);
      expect(await generations(receiver, 3)).to.deep.equal([1, 2, 3]);
      for (const s of [receiver, sender]) {
        const err = await s.closed;
        expect(err?.code).to.equal(ErrorCodes.CONNECTION);
        expect(err?.message).to.contain('code 1006');
      }
      expect((await rejection(receiver.next())).code).to.equal(ErrorCodes.CONNECTION);
      expect(pair.frames[from]).to.equal(4);
    });
  }

  it('cut() cuts at once: frames in flight are lost', async () => {
    const { a, b, cut } = memorySessionPair();
    a.send(commit(1));
    cut();
    expect((await a.closed)?.code).to.equal(ErrorCodes.CONNECTION);
    expect((await b.closed)?.code).to.equal(ErrorCodes.CONNECTION);
    expect(b.counters.framesIn).to.equal(0);
    expect(a.bufferedAmount).to.equal(0);
  });

  it('drops or replaces frames on request; a replaced frame that does not decode ends both sides with TM_ERR_PROTOCOL', async () => {
    const garbage = Buffer.from([0xc1, 0xff, 0x00, 0x13]);
    const { a, b } = memorySessionPair({
      onFrame: (side, index) => (side !== 'a' ? 'pass' : index === 1 ? 'drop' : index === 2 ? { replace: encode(commit(30)) } : index === 4 ? { replace: garbage } : 'pass'),
    });
    for (let g = 1; g <= 5; g++) a.send(commit(g));
    garbage.fill(0); // the replacement was copied when it was sent
    expect(await generations(b, 3)).to.deep.equal([1, 30, 4]);
    expect((await rejection(b.next())).code).to.equal(ErrorCodes.PROTOCOL);
    expect((await a.closed)?.code).to.equal(ErrorCodes.PROTOCOL); // from b's error frame
  });

  it("fail() sends the error frame first: the peer ends with that error's code, after the messages sent before it", async () => {
    const { a, b, frames } = memorySessionPair({ names: ['secondary test', 'primary test'] });
    a.send(commit(1));
    a.fail(new TmError(ErrorCodes.AUTH_FAILED, 'keys differ'));
    expect(frames.a).to.equal(2); // the commit and the error frame
    expect(() => a.send(commit(2))).to.throw(TmError).with.property('code', ErrorCodes.AUTH_FAILED);
    expect(await generations(b, 1)).to.deep.equal([1]);
    const err = await rejection(b.next());
    expect(err.code).to.equal(ErrorCodes.AUTH_FAILED);
    expect(err.message).to.equal('primary test ended the session: keys differ');
    expect((await a.closed)?.code).to.equal(ErrorCodes.AUTH_FAILED);
  });

  it('close() reaches the peer as a normal close (TM_ERR_CONNECTION "closed the session"); messages sent before it stay readable', async () => {
    const { a, b } = memorySessionPair({ names: ['secondary test', 'primary test'] });
    let ends = 0;
    b.on('end', () => ends++);
    a.send(commit(1));
    a.close();
    a.close(); // idempotent
    expect(await a.closed).to.equal(null);
    const err = await b.closed;
    expect(err?.code).to.equal(ErrorCodes.CONNECTION);
    expect(err?.message).to.equal('primary test closed the session');
    expect(await generations(b, 1)).to.deep.equal([1]);
    expect((await rejection(b.next())).code).to.equal(ErrorCodes.CONNECTION);
    expect(ends).to.equal(1);
  });

  it('regression (issue 14 §1): an error frame from a peer that never closes still closes our side of the connection', async () => {
    const { a, b } = memorySessionPair();
    // b speaks raw: an error frame, and no close after it.
    b.channel.send([encode({ type: "error", code: ErrorCodes.AUTH_FAILED, message: "go away" })]);
    const err = await a.closed;
    expect(err?.code).to.equal(ErrorCodes.AUTH_FAILED);
    // a closed the connection: b sees the close (before the fix b stayed open for ever).
    const seen = await Promise.race([b.closed.then(() => 'closed'), new Promise((r) => setTimeout(() => r('still open'), 500))]);
    expect(seen).to.equal('closed');
  });

  it('destroy() ends the peer with an abnormal close (1006)', async () => {
    const { a, b } = memorySessionPair();
    a.destroy();
    expect((await a.closed)?.code).to.equal(ErrorCodes.ABORTED);
    const err = await b.closed;
    expect(err?.code).to.equal(ErrorCodes.CONNECTION);
    expect(err?.message).to.contain('code 1006');
  });

  it('every frame arrives as a copy: the sender may reuse its buffer at once', async () => {
    const { a, b } = memorySessionPair();
    const frame = Buffer.from(encode({ type: 'error', code: 'TM_ERR_PEER', message: 'x'.repeat(100) }));
    const original = Buffer.from(frame);
    a.channel.send([frame]);
    frame.fill(0xc1); // msgpack "never used": undecodable if b saw this
    const err = await rejection(b.next());
    expect(err.code).to.equal(ErrorCodes.PEER);
    expect(err.message).to.contain('x'.repeat(100));
    expect(b.counters.bytesIn).to.equal(original.length);
  });

  it('next(timeout) on a silent peer fails with TM_ERR_TIMEOUT, and the peer learns it', async () => {
    const { a, b } = memorySessionPair();
    const t0 = Date.now();
    expect((await rejection(b.next(50))).code).to.equal(ErrorCodes.TIMEOUT);
    expect(Date.now() - t0).to.be.at.least(45);
    expect((await a.closed)?.code).to.equal(ErrorCodes.TIMEOUT);
  });
});
