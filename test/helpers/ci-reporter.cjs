// Mocha reporter for .ci/run: the spec reporter's output, plus mocha's own
// counts written as JSON to $TM_TEST_RESULTS so that .ci/run can print its
// closing line from them.
'use strict';
const fs = require('node:fs');
const Mocha = require('mocha');

class CiReporter extends Mocha.reporters.Spec {
  constructor(runner, options) {
    super(runner, options);
    runner.once(Mocha.Runner.constants.EVENT_RUN_END, () => {
      const file = process.env.TM_TEST_RESULTS || 'test-results.json';
      const s = this.stats;
      fs.writeFileSync(file, JSON.stringify({ passes: s.passes, failures: s.failures, pending: s.pending, tests: s.tests }) + '\n');
    });
  }
}

module.exports = CiReporter;
