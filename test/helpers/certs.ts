import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';

/** Paths of one certificate and its private key (PEM). */
export interface CertFiles {
  cert: string;
  key: string;
}

/** A certificate authority made by {@link makeCa}: its certificate and what `openssl ca` needs to sign with it. */
export interface Ca extends CertFiles {
  name: string;
  dir: string;
  config: string;
}

/** Run openssl; throws with its stderr on failure, and says how to install it when it is missing. */
export function openssl(args: string[], o: { san?: string } = {}): string {
  // SAN: the server certificate's subjectAltName ($ENV::SAN in our config; always set, openssl expands it at load).
  const r = spawnSync('openssl', args, { encoding: 'utf8', timeout: 60_000, env: { ...process.env, SAN: o.san ?? DEFAULT_SAN } });
  if (r.error && (r.error as NodeJS.ErrnoException).code === 'ENOENT') {
    throw new Error('the openssl command is missing: install openssl (apt-get install -y openssl)');
  }
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`openssl ${args.join(' ')} exited ${r.status}:\n${r.stderr}`);
  return r.stdout;
}

/** The subjectAltName of a server certificate unless told otherwise: what a peer URL on loopback names. */
export const DEFAULT_SAN = 'IP:127.0.0.1, DNS:localhost';

/** Fails (never skips) when the openssl CLI is not installed. */
export function requireOpenssl(): string {
  return openssl(['version']).trim();
}

/** UTC time in openssl's GeneralizedTime form: YYYYMMDDHHMMSSZ. */
function opensslTime(d: Date): string {
  return d.toISOString().replace(/[-:T]/g, '').replace(/\.\d+Z$/, 'Z');
}

/**
 * A config of our own (no dependency on the system's openssl.cnf) for `req`
 * and `ca`: a flat database per CA, any subject, the extensions of a CA, a
 * server (serverAuth, subjectAltName from $SAN) and a client (clientAuth).
 */
function caConfig(dir: string): string {
  return `[ req ]
distinguished_name = dn
prompt = no
[ dn ]
CN = unused
[ ca ]
default_ca = this_ca
[ this_ca ]
dir = ${dir}
database = ${dir}/index.txt
serial = ${dir}/serial
new_certs_dir = ${dir}/issued
certificate = ${dir}/ca.pem
private_key = ${dir}/ca.key
default_md = sha256
policy = any
unique_subject = no
copy_extensions = none
email_in_dn = no
[ any ]
commonName = supplied
[ v3_ca ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ server ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $ENV::SAN
authorityKeyIdentifier = keyid
[ client ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
`;
}

/** A self-signed CA (EC P-256) under `dir/name/`. */
export function makeCa(dir: string, name: string): Ca {
  const caDir = path.join(dir, name);
  mkdirSync(path.join(caDir, 'issued'), { recursive: true });
  const config = path.join(caDir, 'openssl.cnf');
  writeFileSync(config, caConfig(caDir));
  writeFileSync(path.join(caDir, 'index.txt'), '');
  writeFileSync(path.join(caDir, 'serial'), '1000\n');
  const key = path.join(caDir, 'ca.key');
  const cert = path.join(caDir, 'ca.pem');
  openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', key]);
  openssl(['req', '-config', config, '-new', '-x509', '-key', key, '-out', cert, '-days', '3650', '-subj', `/CN=${name}`, '-extensions', 'v3_ca', '-sha256']);
  return { name, dir: caDir, config, cert, key };
}

/**
 * A leaf certificate signed by `ca`: `kind` server (subjectAltName `san`,
 * default {@link DEFAULT_SAN}) or client. Valid from yesterday for a year,
 * or, with `expired`, only during one day in 2020.
 */
export function issue(ca: Ca, name: string, kind: 'server' | 'client', o: { expired?: boolean; san?: string } = {}): CertFiles {
  const key = path.join(ca.dir, `${name}.key`);
  const csr = path.join(ca.dir, `${name}.csr`);
  const cert = path.join(ca.dir, `${name}.pem`);
  openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', key]);
  openssl(['req', '-config', ca.config, '-new', '-key', key, '-out', csr, '-subj', `/CN=${name}`]);
  const now = Date.now();
  const [start, end] = o.expired
    ? [new Date('2020-01-01T00:00:00Z'), new Date('2020-01-02T00:00:00Z')]
    : [new Date(now - 86_400_000), new Date(now + 365 * 86_400_000)];
  openssl(['ca', '-batch', '-config', ca.config, '-in', csr, '-out', cert, '-notext', '-extensions', kind, '-startdate', opensslTime(start), '-enddate', opensslTime(end)], { san: o.san });
  return { cert, key };
}

/** Everything the TLS tests use, generated under `dir` at test time. */
export interface TestPki {
  ca: Ca;
  server: CertFiles;
  client: CertFiles;
  expiredClient: CertFiles;
  expiredServer: CertFiles;
  otherCa: Ca;
  otherClient: CertFiles;
  otherServer: CertFiles;
  /** Signed by `ca` but for another host (DNS:elsewhere.example only). */
  wrongHostServer: CertFiles;
}

export function makeTestPki(dir: string): TestPki {
  requireOpenssl();
  const ca = makeCa(dir, 'test-ca');
  const otherCa = makeCa(dir, 'other-ca');
  return {
    ca,
    server: issue(ca, 'site-b', 'server'),
    client: issue(ca, 'site-a', 'client'),
    expiredClient: issue(ca, 'site-a-expired', 'client', { expired: true }),
    expiredServer: issue(ca, 'site-b-expired', 'server', { expired: true }),
    otherCa,
    otherClient: issue(otherCa, 'site-a-other', 'client'),
    otherServer: issue(otherCa, 'site-b-other', 'server'),
    wrongHostServer: issue(ca, 'site-b-elsewhere', 'server', { san: 'DNS:elsewhere.example' }),
  };
}
