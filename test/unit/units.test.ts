import { expect } from 'chai';
import { formatBytes, isValidChunkSize, parseDuration, parseSize } from '../../src/util/units.js';

describe('units: sizes and durations', () => {
  it('parses binary and decimal sizes', () => {
    expect(parseSize('64KiB')).to.equal(65536);
    expect(parseSize('4M')).to.equal(4 * 1024 * 1024);
    expect(parseSize('1GB')).to.equal(1e9);
    expect(parseSize('1.5KiB')).to.equal(1536);
    expect(parseSize(4096)).to.equal(4096);
    expect(parseSize('512')).to.equal(512);
  });
  it('refuses malformed sizes with TM_ERR_PARSE', () => {
    for (const bad of ['', 'KiB', '64 XB', '-1', '1e3', 'abc']) {
      expect(() => parseSize(bad), bad).to.throw().with.property('code', 'TM_ERR_PARSE');
    }
    expect(() => parseSize(-5)).to.throw().with.property('code', 'TM_ERR_PARSE');
  });
  it('parses durations into seconds', () => {
    expect(parseDuration('30s')).to.equal(30);
    expect(parseDuration('500ms')).to.equal(0.5);
    expect(parseDuration('2m')).to.equal(120);
    expect(parseDuration('1h')).to.equal(3600);
    expect(() => parseDuration('5 parsecs')).to.throw().with.property('code', 'TM_ERR_PARSE');
  });
  it('formats bytes and checks chunk sizes', () => {
    expect(formatBytes(512)).to.equal('512 B');
    expect(formatBytes(1536)).to.equal('1.50 KiB');
    expect(formatBytes(64 * 1024 * 1024)).to.equal('64.0 MiB');
    expect(isValidChunkSize(4096)).to.equal(true);
    expect(isValidChunkSize(4 * 1024 * 1024)).to.equal(true);
    expect(isValidChunkSize(2048)).to.equal(false);
    expect(isValidChunkSize(8 * 1024 * 1024)).to.equal(false);
    expect(isValidChunkSize(65536 + 4096)).to.equal(false);
  });
});
