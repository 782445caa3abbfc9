#!/usr/bin/env node
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { asTmError, ErrorCodes, TmError } from './errors.js';

const HELP = `thinmirror: asynchronous mirroring of thin-provisioned volumes

Usage:
  thinmirror run --config FILE              run the daemon of this host
  thinmirror status --config FILE [--json]  show the mirrors of a running daemon
  thinmirror map PATH [--json] [--chunk-size SIZE]
                                            print the allocation map of a volume
  thinmirror rollback MIRROR --config FILE [--json]
                                            restore a stopped secondary's replica to its
                                            last committed generation
  thinmirror promote MIRROR [--force] --config FILE [--json]
                                            make this secondary the primary (failover)
  thinmirror demote MIRROR --config FILE [--json]
                                            make this primary a secondary, keeping what it
                                            changed for the reverse resync (failback)
  thinmirror switchover MIRROR --config FILE [--json]
                                            planned role swap with the peer, no data lost
  thinmirror resolve MIRROR --discard-local --config FILE [--json]
                                            end a split brain, discarding this side's changes
  thinmirror drill start MIRROR [--name NAME] --config FILE [--json]
                                            writable clone of a secondary's consistent
                                            image while replication goes on (docs/drills.md)
  thinmirror drill list --config FILE [--json]
  thinmirror drill stop MIRROR NAME [--force] --config FILE [--json]
                                            delete a drill's clone (refused while in use)
  thinmirror keygen FILE [--force]          write a new pre-shared key file (auth.pskFile):
                                            32 random bytes, base64, mode 0600
  thinmirror demo [--size SIZE] [--keep]    mirror a sample volume on loopback, end to end
  thinmirror --help | --version

Exit status: 0 success, 1 failure, 2 bad usage. Manual: docs/cli.md`;

/** Exit codes. */
export const EXIT = { OK: 0, FAILURE: 1, USAGE: 2 } as const;

function parse<T extends ParseArgsConfig['options']>(command: string, args: string[], options: T, positionals = 0) {
  try {
    const r = parseArgs({ args, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: positionals > 0, strict: true });
    if (r.positionals.length > positionals) throw new Error(`unexpected argument "${r.positionals[positionals]}"`);
    return r;
  } catch (e) {
    throw new TmError(ErrorCodes.USAGE, `${command}: ${(e as Error).message.replace(/\. To specify a positional.*$/s, '')}`);
  }
}

function requireOpt(command: string, value: string | undefined, name: string): string {
  if (!value) throw new TmError(ErrorCodes.USAGE, `${command}: --${name} is required`);
  return value;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === 'help' || command === '--help' || command === '-h') {
    console.log(HELP);
    return command ? EXIT.OK : EXIT.USAGE;
  }
  if (command === '--version' || command === 'version') {
    const { VERSION } = await import('./daemon/daemon.js');
    console.log(VERSION);
    return EXIT.OK;
  }
  switch (command) {
    case 'run': {
      const { values } = parse('run', rest, { config: { type: 'string', short: 'c' } });
      if (values.help) return help();
      const { runDaemon } = await import('./cli/run.js');
      return runDaemon(requireOpt('run', values.config, 'config'));
    }
    case 'status': {
      const { values } = parse('status', rest, { config: { type: 'string', short: 'c' }, json: { type: 'boolean' } });
      if (values.help) return help();
      const { loadConfig } = await import('./daemon/config.js');
      const { controlRequest } = await import('./daemon/control.js');
      const { formatStatus } = await import('./cli/status.js');
      const cfg = await loadConfig(requireOpt('status', values.config, 'config'));
      const st = await controlRequest<import('./daemon/control.js').DaemonStatus>(cfg.node.stateDir, '/status');
      console.log(values.json ? JSON.stringify(st, null, 2) : formatStatus(st));
      return EXIT.OK;
    }
    case 'map': {
      const { values, positionals } = parse('map', rest, { json: { type: 'boolean' }, 'chunk-size': { type: 'string' } }, 1);
      if (values.help) return help();
      const { parseSize, isValidChunkSize } = await import('./util/units.js');
      const file = positionals[0];
      if (!file) throw new TmError(ErrorCodes.USAGE, 'map: PATH is required');
      const chunk = values['chunk-size'] === undefined ? 64 * 1024 : parseSize(values['chunk-size']);
      if (!isValidChunkSize(chunk)) throw new TmError(ErrorCodes.USAGE, `map: --chunk-size ${values['chunk-size']} is not a power of two between 4KiB and 4MiB`);
      const { describeMap, formatMap } = await import('./volume/map.js');
      const m = await describeMap(file, chunk);
      console.log(values.json ? JSON.stringify(m, null, 2) : formatMap(m));
      return EXIT.OK;
    }
    case 'rollback': {
      const { values, positionals } = parse('rollback', rest, { config: { type: 'string', short: 'c' }, json: { type: 'boolean' } }, 1);
      if (values.help) return help();
      const name = positionals[0];
      if (!name) throw new TmError(ErrorCodes.USAGE, 'rollback: MIRROR is required');
      const { runRollback } = await import('./cli/rollback.js');
      return runRollback(requireOpt('rollback', values.config, 'config'), name, values.json ?? false);
    }
    case 'promote':
    case 'demote':
    case 'switchover':
    case 'resolve': {
      const { values, positionals } = parse(
        command,
        rest,
        { config: { type: 'string', short: 'c' }, json: { type: 'boolean' }, force: { type: 'boolean' }, 'discard-local': { type: 'boolean' } },
        1,
      );
      if (values.help) return help();
      const name = positionals[0];
      if (!name) throw new TmError(ErrorCodes.USAGE, `${command}: MIRROR is required`);
      if (values.force && command !== 'promote') throw new TmError(ErrorCodes.USAGE, `${command}: --force goes with promote only`);
      if (values['discard-local'] && command !== 'resolve') throw new TmError(ErrorCodes.USAGE, `${command}: --discard-local goes with resolve only`);
      if (command === 'resolve' && !values['discard-local']) throw new TmError(ErrorCodes.USAGE, 'resolve: --discard-local is required (run it on the side whose changes are thrown away)');
      const { runRoleAction } = await import('./cli/role.js');
      return runRoleAction(requireOpt(command, values.config, 'config'), command, name, { force: values.force ?? false, discardLocal: values['discard-local'] ?? false, json: values.json ?? false });
    }
    case 'drill': {
      const { values, positionals } = parse('drill', rest, { config: { type: 'string', short: 'c' }, name: { type: 'string' }, force: { type: 'boolean' }, json: { type: 'boolean' } }, 3);
      if (values.help) return help();
      const { runDrill } = await import('./cli/drill.js');
      return runDrill(requireOpt('drill', values.config, 'config'), positionals, { name: values.name, force: values.force ?? false, json: values.json ?? false });
    }
    case 'keygen': {
      const { values, positionals } = parse('keygen', rest, { force: { type: 'boolean' } }, 1);
      if (values.help) return help();
      const file = positionals[0];
      if (!file) throw new TmError(ErrorCodes.USAGE, 'keygen: FILE is required');
      const { runKeygen } = await import('./cli/keygen.js');
      return runKeygen(file, values.force ?? false);
    }
    case 'demo': {
      const { values } = parse('demo', rest, { size: { type: 'string' }, keep: { type: 'boolean' } });
      if (values.help) return help();
      const { parseSize } = await import('./util/units.js');
      const { runDemo } = await import('./cli/demo.js');
      return runDemo({ size: values.size === undefined ? undefined : parseSize(values.size), keep: values.keep ?? false });
    }
    default:
      throw new TmError(ErrorCodes.USAGE, `unknown command "${command}" (try --help)`);
  }
}

function help(): number {
  console.log(HELP);
  return EXIT.OK;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    const err = asTmError(e);
    console.error(`thinmirror: ${err.code}: ${err.message}`);
    if (err.code === ErrorCodes.INTERNAL && e instanceof Error && e.stack) console.error(e.stack);
    process.exitCode = err.code === ErrorCodes.USAGE ? EXIT.USAGE : EXIT.FAILURE;
  },
);
