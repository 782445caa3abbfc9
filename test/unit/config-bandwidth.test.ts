import { expect } from 'chai';
import { parseConfig, peerKey } from '../../src/daemon/config.js';
import { TmError } from '../../src/errors.js';
import { parseRate } from '../../src/util/units.js';
import { configProblems } from '../helpers/config.js';

const MiB = 1024 * 1024;
const HEAD = 'node: { name: a, stateDir: /var/lib/tm }\nauth: { pskFile: /etc/tm/psk }\n';
const PRIMARIES = `mirrors:
  - { name: m1, role: primary, volume: /v/m1.img, peer: "ws://127.0.0.1:7890" }
  - { name: m2, role: primary, volume: /v/m2.img, peer: "ws://127.0.0.1:7890", bandwidth: 10MiB/s }
  - { name: m3, role: primary, volume: /v/m3.img, peer: "ws://127.0.0.2:7890" }
`;

const problems = (text: string) => configProblems(text, '/etc/tm/c.yaml');

describe('units: parseRate (bandwidth caps)', () => {
  it('parses bytes per second with binary and decimal units, with or without /s', () => {
    expect(parseRate('100MiB/s')).to.equal(100 * MiB);
    expect(parseRate('50MB/s')).to.equal(50_000_000);
    expect(parseRate('1 GiB / s')).to.equal(1024 * MiB);
    expect(parseRate('512KiB')).to.equal(512 * 1024);
    expect(parseRate(1000)).to.equal(1000);
  });

  it('refuses zero, bits, garbage and negative numbers with TM_ERR_PARSE', () => {
    for (const bad of ['0MiB/s', '100Mbit/s', 'fast', '-5MiB/s', 0, -1, '10MiB/h']) {
      expect(() => parseRate(bad as string | number), String(bad)).to.throw(TmError).with.property('code', 'TM_ERR_PARSE');
    }
  });
});

describe('config: bandwidth per mirror and per peer', () => {
  it('no bandwidth key: no cap on any mirror', () => {
    const c = parseConfig(HEAD + PRIMARIES.replace(', bandwidth: 10MiB/s', ''), '/etc/tm/c.yaml');
    for (const m of c.mirrors) {
      expect(m.bandwidth).to.equal(undefined);
      expect(m.peerBandwidth).to.equal(undefined);
    }
  });

  it('a mirror cap applies to that mirror; a peer cap to every primary mirror with that host:port', () => {
    const c = parseConfig(`${HEAD}peers:\n  - { url: "ws://127.0.0.1:7890", bandwidth: 100MiB/s }\n${PRIMARIES}`, '/etc/tm/c.yaml');
    const [m1, m2, m3] = c.mirrors;
    expect(m1).to.deep.include({ peerBandwidth: 100 * MiB });
    expect(m1!.bandwidth).to.equal(undefined);
    expect(m2).to.deep.include({ bandwidth: 10 * MiB, peerBandwidth: 100 * MiB });
    expect(m3!.peerBandwidth).to.equal(undefined);
    expect(c.peers).to.deep.equal([{ url: 'ws://127.0.0.1:7890', bandwidth: 100 * MiB }]);
  });

  it('peers are matched by host:port, whatever the scheme or path', () => {
    expect(peerKey('ws://10.0.0.2:7890')).to.equal('10.0.0.2:7890');
    expect(peerKey('wss://10.0.0.2:7890/x')).to.equal('10.0.0.2:7890');
    expect(peerKey('wss://backup.example')).to.equal('backup.example:443');
    expect(peerKey('ws://[::1]:7890')).to.equal('[::1]:7890');
  });

  it('a peer URL that passes the pattern but does not parse (bad port, open bracket) is a config error, also beside peers:', () => {
    const peers = 'peers:\n  - { url: "ws://127.0.0.1:7890", bandwidth: 1MiB/s }\n';
    for (const bad of ['ws://[::1', 'ws://127.0.0.1:99999']) {
      const text = `${HEAD}${peers}${PRIMARIES.replace('"ws://127.0.0.2:7890"', `"${bad}"`)}`;
      expect(problems(text), bad).to.match(/c\.yaml:8:\d+: mirrors\[2\]\.peer: expected a ws:\/\/ or wss:\/\/ URL with a valid host and port/);
    }
  });

  it('a bad rate, a peer no mirror uses, a repeated peer and a cap on a secondary are reported with line and key', () => {
    expect(problems(`${HEAD}${PRIMARIES.replace('10MiB/s', '10Mbit/s')}`)).to.match(/c\.yaml:5:\d+: mirrors\[1\]\.bandwidth: invalid bandwidth "10Mbit\/s"/);
    expect(problems(`${HEAD}peers:\n  - { url: "ws://127.0.0.9:7890", bandwidth: 1MiB/s }\n${PRIMARIES}`)).to.match(/c\.yaml:4:\d+: peers\[0\]\.url: no primary mirror has a peer at 127\.0\.0\.9:7890/);
    expect(
      problems(`${HEAD}peers:\n  - { url: "ws://127.0.0.1:7890", bandwidth: 1MiB/s }\n  - { url: "wss://127.0.0.1:7890", bandwidth: 2MiB/s }\n${PRIMARIES}`),
    ).to.contain('peers[1].url: peer 127.0.0.1:7890 is already listed at peers[0]');
    expect(problems(`${HEAD}peers:\n  - { url: "ws://127.0.0.1:7890", speed: 1MiB/s }\n${PRIMARIES}`)).to.contain('peers[0].speed: unknown key');
    expect(
      problems(`${HEAD}listen: { host: 127.0.0.1, port: 7891 }\nmirrors:\n  - { name: s, role: secondary, volume: /v/s.img, bandwidth: 1MiB/s }\n`),
    ).to.contain('mirrors[0].bandwidth: bandwidth caps what this side sends as primary, to peer:; a mirror without peer: takes none');
  });
});
