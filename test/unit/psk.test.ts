import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { decodeKeyText, MIN_KEY_BYTES, readPsk, writeKeyFile } from '../../src/daemon/psk.js';
import type { TmError } from '../../src/errors.js';
import { testKeyText } from '../helpers/config.js';
import { rejection } from '../helpers/rejection.js';

describe('psk: the pre-shared key file (base64, >= 32 bytes, mode 0600) and keygen', () => {
  let dir: string;
  beforeEach(async () => (dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tm-psk-'))));
  afterEach(() => fsp.rm(dir, { recursive: true, force: true }));

  async function keyFile(text: string | Buffer, mode = 0o600): Promise<string> {
    const f = path.join(dir, `k-${randomBytes(4).toString('hex')}`);
    await fsp.writeFile(f, text);
    await fsp.chmod(f, mode);
    return f;
  }

  async function refusal(file: string): Promise<string> {
    const e = (await rejection(readPsk(file))) as TmError;
    expect(e.code).to.equal('TM_ERR_CONFIG');
    expect(e.message).to.contain(file);
    return e.message;
  }

  it('the key is the base64-decoded bytes; whitespace anywhere (the newline, base64 line breaks) is ignored', async () => {
    const key = randomBytes(32);
    expect(await readPsk(await keyFile(`${key.toString('base64')}\n`))).to.deep.equal(key);
    expect(await readPsk(await keyFile(`  ${key.toString('base64')}\r\n\n`))).to.deep.equal(key);
    expect(await readPsk(await keyFile(key.toString('base64').replace(/=+$/, '')))).to.deep.equal(key);
    // What `head -c 64 /dev/urandom | base64` writes: two lines.
    const long = randomBytes(64);
    const wrapped = long.toString('base64').replace(/(.{76})/g, '$1\n');
    expect(wrapped).to.contain('\n');
    expect(await readPsk(await keyFile(`${wrapped}\n`))).to.deep.equal(long);
  });

  it('decodeKeyText refuses what is not base64 instead of skipping it', () => {
    for (const bad of ['', '\n', 'not base64!', 'abc-def_', 'QUJD=QUJD', 'QUJDR', 'QUI=====', 'AB==', 'é'.repeat(44)]) expect(decodeKeyText(bad), JSON.stringify(bad)).to.equal(null);
    expect(decodeKeyText('QUJD')).to.deep.equal(Buffer.from('ABC'));
    expect(decodeKeyText('QUI=')).to.deep.equal(Buffer.from('AB'));
    expect(decodeKeyText('QUI')).to.deep.equal(Buffer.from('AB'));
  });

  it(`refuses a key of fewer than ${MIN_KEY_BYTES} decoded bytes, with the keygen command to run`, async () => {
    const f = await keyFile(`${randomBytes(31).toString('base64')}\n`);
    const msg = await refusal(f);
    expect(msg).to.contain('holds a key of 31 bytes (after base64 decoding); expected at least 32').and.contain(`thinmirror keygen --force ${f}`);
    // 44 characters of text that are not base64 (the old README's advice read as raw text would pass a length check).
    expect(await refusal(await keyFile('a-secret-key-of-enough-length-0123456789abc\n'))).to.contain('does not hold a base64 key');
    expect(await refusal(await keyFile(randomBytes(32)))).to.contain('does not hold a base64 key');
    expect(await refusal(await keyFile(''))).to.contain('does not hold a base64 key');
  });

  it('refuses a key file accessible by group or others, naming the mode and the chmod to run', async () => {
    for (const mode of [0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o666]) {
      const f = await keyFile(testKeyText('mode'), mode);
      const msg = await refusal(f);
      expect(msg, mode.toString(8)).to.contain(`mode 0${mode.toString(8)}`).and.contain(`run: chmod 600 ${f}`);
    }
    // 0400 and 0600 are fine.
    expect(await readPsk(await keyFile(testKeyText('mode'), 0o400))).to.have.length(32);
    expect(await readPsk(await keyFile(testKeyText('mode'), 0o600))).to.have.length(32);
  });

  it('refuses a missing file, a directory and an oversized file', async () => {
    expect(await refusal(path.join(dir, 'nokey'))).to.contain('ENOENT');
    const sub = path.join(dir, 'sub');
    await fsp.mkdir(sub, { mode: 0o700 });
    expect(await refusal(sub)).to.contain('not a regular file');
    expect(await refusal(await keyFile('A'.repeat(8192)))).to.contain('8192 bytes');
  });

  it('keygen writes 32 random bytes in base64 with mode 0600 (whatever the umask), readable by readPsk', async () => {
    const f = path.join(dir, 'psk');
    const old = process.umask(0o000);
    try {
      await writeKeyFile(f);
    } finally {
      process.umask(old);
    }
    const st = await fsp.stat(f);
    expect(st.mode & 0o777).to.equal(0o600);
    const text = await fsp.readFile(f, 'utf8');
    expect(text).to.match(/^[A-Za-z0-9+/]{43}=\n$/);
    const key = await readPsk(f);
    expect(key).to.have.length(32);
    expect(key.toString('base64')).to.equal(text.trim());
    // Another run gives another key; no temp file is left.
    const g = path.join(dir, 'psk2');
    await writeKeyFile(g);
    expect(await readPsk(g)).not.to.deep.equal(key);
    expect((await fsp.readdir(dir)).sort()).to.deep.equal(['psk', 'psk2']);
  });

  it('keygen refuses an existing file (left untouched) unless force, which replaces it with mode 0600', async () => {
    const f = path.join(dir, 'psk');
    await fsp.writeFile(f, 'the other host\'s key\n', { mode: 0o644 });
    const e = (await rejection(writeKeyFile(f))) as TmError;
    expect(e.code).to.equal('TM_ERR_CONFIG');
    expect(e.message).to.contain(f).and.contain('--force');
    expect(await fsp.readFile(f, 'utf8')).to.equal('the other host\'s key\n');
    await writeKeyFile(f, { force: true });
    expect((await fsp.stat(f)).mode & 0o777).to.equal(0o600);
    expect(await readPsk(f)).to.have.length(32);
    expect(await fsp.readdir(dir)).to.deep.equal(['psk']);
  });

  it('keygen into a missing directory is TM_ERR_CONFIG naming the file', async () => {
    const f = path.join(dir, 'no', 'such', 'psk');
    const e = (await rejection(writeKeyFile(f))) as TmError;
    expect(e.code).to.equal('TM_ERR_CONFIG');
    expect(e.message).to.contain(f).and.contain('ENOENT');
  });
});
