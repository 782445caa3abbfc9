import { expect } from 'chai';
import { createHash } from 'node:crypto';
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

/**
 * The text of a valid pre-shared key file (docs/config.md "The key file"):
 * 32 bytes derived from `label`, base64, newline. The same label gives the
 * same key, so two hosts of a test share one by name. Write it with mode 0600.
 */
export function testKeyText(label: string): string {
  return `${createHash('sha256').update(`thinmirror test key: ${label}`).digest('base64')}\n`;
}
