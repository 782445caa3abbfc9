import { expect } from 'chai';
import { parseConfig } from '../../src/daemon/config.js';
import { TmError } from '../../src/errors.js';

/** Parse a config that must be refused; returns the TM_ERR_CONFIG message (fails the test when it is accepted). */
export function configProblems(text: string, file = '/etc/tm.yaml'): string {
  try {
    parseConfig(text, file);
  } catch (e) {
    expect(e).to.be.instanceOf(TmError);
    expect((e as TmError).code).to.equal('TM_ERR_CONFIG');
    return (e as Error).message;
  }
  return expect.fail('the config was accepted');
}
