import { expect } from 'chai';
import { asTmError, ErrorCodes, isTmError, TmError } from '../../src/errors.js';

describe('TmError across copies of errors.ts (the daemon runs from a bundle with its own copy)', () => {
  it('an error made by another copy of the module is a TmError here: instanceof, isTmError and asTmError keep its code', async () => {
    // A query string makes the loader evaluate the module a second time: another class, as in the bundle.
    const copy = (await import(`../../src/errors.js?copy=${Date.now()}`)) as typeof import('../../src/errors.js');
    expect(copy.TmError).to.not.equal(TmError);
    const e = new copy.TmError(ErrorCodes.LOCKED, 'state directory /x is locked by pid 42');
    expect(e instanceof TmError).to.equal(true);
    expect(isTmError(e)).to.equal(true);
    const kept = asTmError(e);
    expect(kept).to.equal(e);
    expect(kept.code).to.equal('TM_ERR_LOCKED');
    // And the other way round.
    expect(new TmError(ErrorCodes.STATE, 's') instanceof copy.TmError).to.equal(true);
  });

  it('anything else is not a TmError', () => {
    for (const x of [new Error('e'), Object.assign(new Error('e'), { code: 'TM_ERR_LOCKED', name: 'TmError' }), { code: 'TM_ERR_STATE' }, null, undefined, 'TM_ERR_STATE', 7]) {
      expect(x instanceof TmError, String(x)).to.equal(false);
      expect(isTmError(x)).to.equal(false);
    }
    expect(asTmError(new Error('boom')).code).to.equal('TM_ERR_INTERNAL');
    expect(asTmError(Object.assign(new Error('full'), { code: 'ENOSPC' }), ErrorCodes.VOLUME_IO, '/t').code).to.equal('TM_ERR_NO_SPACE');
  });
});
