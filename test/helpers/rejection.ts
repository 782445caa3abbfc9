import { expect } from 'chai';
import { TmError } from '../../src/errors.js';

/** The TmError a promise rejects with; fails the test when it resolves or rejects with anything else. */
export async function rejection(p: Promise<unknown>): Promise<TmError> {
  const e = await p.then(
    () => expect.fail('expected a rejection'),
    (err: unknown) => err,
  );
  expect(e).to.be.instanceOf(TmError);
  return e as TmError;
}
