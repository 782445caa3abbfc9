#!/usr/bin/env node
/**
 * After tsc: bundle the daemon's entry (dist/cli/run.js, what `thinmirror run`
 * imports) with everything it imports into that one file, so that a daemon
 * starts without resolving and compiling about a hundred modules one by one:
 * importing it took 420-460 ms here, 180-270 ms bundled (issue 13: the
 * daemon's start counts in the initial sync's time). The other commands keep
 * tsc's files. Native modules stay outside (roaring, ws's and msgpackr's
 * optional addons; our addon is loaded by path at run time). The file keeps
 * its place, so paths taken relative to it (package.json, build/Release,
 * dist/cli.js) resolve as from tsc's output.
 */
import { build } from 'esbuild';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const file = fileURLToPath(new URL('../dist/cli/run.js', import.meta.url));
const MARK = '// thinmirror: bundled by scripts/bundle-run.mjs';
if (readFileSync(file, 'utf8').startsWith(MARK)) {
  console.log(`${file} is already bundled (run tsc first to bundle again)`);
  process.exit(0);
}
await build({
  entryPoints: [file],
  outfile: file,
  allowOverwrite: true,
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  sourcemap: true,
  external: ['roaring', 'bufferutil', 'utf-8-validate', 'msgpackr-extract'],
  // CommonJS dependencies call require() for the modules left outside.
  banner: { js: `${MARK}\nimport { createRequire as __tmCreateRequire } from 'node:module';\nconst require = __tmCreateRequire(import.meta.url);` },
  logLevel: 'warning',
});
