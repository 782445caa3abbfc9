import { expect } from 'chai';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { newState, parseState, StateFile, STATE_FORMAT } from '../../src/mirror/state.js';

const FIXTURES = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'state-format1');

describe('state.json (mirror/state)', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tm-state-'));
  });
  afterEach(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  it('migrates a primary state.json of format 1 written by 0.1.0 (generation 1 pending mid-sync)', async () => {
    const raw = JSON.parse(await fsp.readFile(path.join(FIXTURES, 'primary', 'state.json'), 'utf8'));
    expect(raw.format).to.equal(1);
    const { state, migrated } = parseState(raw, 'fixture');
    expect(migrated).to.equal(true);
    expect(state).to.deep.equal({
      format: STATE_FORMAT,
      role: 'primary',
      volumeId: raw.volumeId,
      volumeSize: 268435456,
      chunkSize: 65536,
      peerNode: null,
      generation: 1,
      committedGeneration: 0,
      pending: 1,
      cursor: raw.cursor,
      reconcile: null,
      oldestUncommittedAt: raw.oldestUncommittedAt,
      applying: null,
      committedAt: null,
    });
  });

  it('migrates a secondary state.json of format 1 written by 0.1.0 (applying generation 1)', async () => {
    const raw = JSON.parse(await fsp.readFile(path.join(FIXTURES, 'secondary', 'state.json'), 'utf8'));
    const { state, migrated } = parseState(raw, 'fixture');
    expect(migrated).to.equal(true);
    expect(state).to.include({ format: 2, role: 'secondary', peerNode: 'site-a', generation: 1, committedGeneration: 0, pending: null, cursor: 0, committedAt: null });
    expect(state.applying).to.deep.equal(raw.applying);
  });

  it('StateFile.load writes a migrated file back in format 2, atomically, and reads it again unchanged', async () => {
    await fsp.copyFile(path.join(FIXTURES, 'secondary', 'state.json'), path.join(dir, 'state.json'));
    const f = new StateFile(dir);
    await f.init();
    const first = await f.load();
    expect(first?.migrated).to.equal(true);
    const onDisk = JSON.parse(await fsp.readFile(path.join(dir, 'state.json'), 'utf8'));
    expect(onDisk.format).to.equal(2);
    const second = await f.load();
    expect(second?.migrated).to.equal(false);
    expect(second?.state).to.deep.equal(first?.state);
  });

  it('no file: undefined; a save then a load gives the same state', async () => {
    const f = new StateFile(dir);
    await f.init();
    expect(await f.load()).to.equal(undefined);
    const s = newState('secondary', { volumeId: '0a1b', volumeSize: 1 << 20, chunkSize: 4096, peerNode: 'x' });
    await f.save(s);
    expect((await f.load())?.state).to.deep.equal(s);
  });

  it('refuses unknown formats and bad fields with TM_ERR_STATE naming the file and the field', () => {
    const good = newState('primary', { volumeId: 'ab', volumeSize: 1 << 20, chunkSize: 4096 });
    const bad = (v: unknown) => {
      try {
        parseState(v, '/var/lib/x/state.json');
      } catch (e) {
        return e as { code: string; message: string };
      }
      throw new Error('accepted');
    };
    expect(bad({ ...good, format: 3 })).to.include({ code: 'TM_ERR_STATE' });
    expect(bad({ ...good, format: 3 }).message).to.match(/state\.json: unknown state format 3/);
    expect(bad(null).message).to.match(/unknown state format/);
    expect(bad({ ...good, cursor: -1 }).message).to.match(/state\.json: cursor:/);
    expect(bad({ ...good, role: 'observer' }).message).to.match(/role/);
    expect(bad({ ...good, chunkSize: 1000 }).message).to.match(/chunkSize: expected a power of two/);
    expect(bad({ ...good, volumeId: '../x' }).message).to.match(/volumeId/);
    expect(bad({ ...good, extra: 1 }).message).to.match(/extra|Unrecognized/i);
    const { format: _f, ...noFormat } = good;
    expect(bad(noFormat).message).to.match(/unknown state format undefined/);
  });
});
