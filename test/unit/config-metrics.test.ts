import { expect } from 'chai';
import { parseConfig } from '../../src/daemon/config.js';
import { configProblems } from '../helpers/config.js';

const BASE = 'node: { name: a, stateDir: /var/lib/tm }\nauth: { pskFile: /etc/tm/psk }\nlisten: { host: 127.0.0.1, port: 7890 }\nmirrors:\n  - { name: m, role: secondary, volume: /v/m.img }\n';

const problems = (text: string) => configProblems(text, '/etc/tm/c.yaml');

describe('config: the metrics key (TCP listener of GET /metrics)', () => {
  it('is optional; absent means no TCP listener', () => {
    expect(parseConfig(BASE, '/etc/tm/c.yaml').metrics).to.equal(undefined);
  });

  it('metrics: { host, port } is kept as given', () => {
    expect(parseConfig(`${BASE}metrics: { host: 0.0.0.0, port: 9464 }\n`, '/etc/tm/c.yaml').metrics).to.deep.equal({ host: '0.0.0.0', port: 9464 });
  });

  it('a bad port, a missing host, an unknown key and the listen port are reported with line and key', () => {
    expect(problems(`${BASE}metrics: { host: 127.0.0.1, port: 70000 }\n`)).to.match(/c\.yaml:6:\d+: metrics\.port: /);
    expect(problems(`${BASE}metrics: { port: 9464 }\n`)).to.contain('metrics.host');
    expect(problems(`${BASE}metrics: { host: h, port: 9464, path: /m }\n`)).to.contain('metrics.path: unknown key');
    expect(problems(`${BASE}metrics: { host: 127.0.0.1, port: 7890 }\n`)).to.match(/metrics\.port: expected a port other than listen's \(127\.0\.0\.1:7890\)/);
  });
});
