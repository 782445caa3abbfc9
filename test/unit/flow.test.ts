import { expect } from 'chai';
import { TmError } from '../../src/errors.js';
import { FlowControl } from '../../src/mirror/flow.js';

describe('flow control: bytes in flight bounded by acknowledgements', () => {
  it('lets frames through below the bound and waits above it until an ack', async () => {
    const f = new FlowControl(100);
    await f.ready();
    f.sent(1, 60, 1000);
    await f.ready();
    f.sent(2, 60, 2000);
    expect(f.bytesInFlight).to.equal(120);
    let released = false;
    const p = f.ready().then(() => (released = true));
    await new Promise((r) => setImmediate(r));
    expect(released).to.equal(false);
    f.acked(1);
    await p;
    expect(released).to.equal(true);
    expect(f.bytesInFlight).to.equal(60);
    expect(f.ackedEnd).to.equal(1000);
    expect(f.drained).to.equal(false);
    f.acked(2);
    expect(f.drained).to.equal(true);
    expect(f.ackedEnd).to.equal(2000);
  });

  it('an ack releases every earlier seq at once', () => {
    const f = new FlowControl(1000);
    for (let i = 1; i <= 5; i++) f.sent(i, 10, i * 10);
    f.acked(4);
    expect(f.bytesInFlight).to.equal(10);
    expect(f.ackedEnd).to.equal(40);
  });

  it('a failure rejects the waiting sender and every later call', async () => {
    const f = new FlowControl(10);
    f.sent(1, 20, 1);
    const p = f.ready();
    f.fail(new TmError('TM_ERR_CONNECTION', 'gone'));
    try {
      await p;
      expect.fail('should reject');
    } catch (e) {
      expect((e as TmError).code).to.equal('TM_ERR_CONNECTION');
    }
    try {
      await f.ready();
      expect.fail('should reject');
    } catch (e) {
      expect((e as TmError).code).to.equal('TM_ERR_CONNECTION');
    }
  });
});
