/**
 * The layering of src/ (docs/architecture.md, DESIGN.md "Layers"), checked by
 * `npm run lint:layers` and by test/unit/layers.test.ts.
 *
 *   cli (src/cli.ts, src/cli/) → daemon → mirror → {track, wire} → volume → native
 *   util (src/util/) and src/errors.ts sit below all of them.
 *
 * A layer may import any layer below it (transitively below is fine: mirror may
 * import volume, daemon may import wire), never one above it; track and wire
 * are siblings and import neither each other. util imports only errors;
 * errors imports nothing of src/. Type-only imports count too
 * (tsPreCompilationDeps): a layer that names an upper layer's type depends on it.
 *
 * One rule per forbidden pair, named `no-upward-<from>-to-<to>` (or
 * `no-sibling-…`), so a violation says which layer imported which.
 */

/** Layers top to bottom: the path of each, and what it may import besides itself. */
const LAYERS = {
  cli: { path: '^src/(cli\\.ts$|cli/)', may: ['daemon', 'mirror', 'track', 'wire', 'volume', 'native', 'util', 'errors'] },
  daemon: { path: '^src/daemon/', may: ['mirror', 'track', 'wire', 'volume', 'native', 'util', 'errors'] },
  mirror: { path: '^src/mirror/', may: ['track', 'wire', 'volume', 'native', 'util', 'errors'] },
  track: { path: '^src/track/', may: ['volume', 'native', 'util', 'errors'] },
  wire: { path: '^src/wire/', may: ['volume', 'native', 'util', 'errors'] },
  volume: { path: '^src/volume/', may: ['native', 'util', 'errors'] },
  native: { path: '^src/native/', may: ['util', 'errors'] },
  util: { path: '^src/util/', may: ['errors'] },
  errors: { path: '^src/errors\\.ts$', may: [] },
};

const SIBLINGS = [['track', 'wire']];
const names = Object.keys(LAYERS);
const isSibling = (a, b) => SIBLINGS.some(([x, y]) => (x === a && y === b) || (x === b && y === a));

const layerRules = names.flatMap((from) =>
  names
    .filter((to) => to !== from && !LAYERS[from].may.includes(to))
    .map((to) => {
      const kind = isSibling(from, to) ? 'sibling' : 'upward';
      return {
        name: `no-${kind}-${from}-to-${to}`,
        severity: 'error',
        comment:
          kind === 'sibling'
            ? `${from} and ${to} are sibling layers: neither imports the other (put what both need in a layer below them).`
            : `${from} may import only ${LAYERS[from].may.join(', ') || 'nothing of src/'}; ${to} is above it.`,
        from: { path: LAYERS[from].path },
        to: { path: LAYERS[to].path },
      };
    }),
);

const anyLayer = names.map((n) => LAYERS[n].path);

/** @type {import('dependency-cruiser').IConfiguration} */
module.exports = {
  forbidden: [
    ...layerRules,
    {
      name: 'no-circular',
      severity: 'error',
      comment: 'No import cycles anywhere in src/ (type-only imports included).',
      from: { path: '^src/' },
      to: { circular: true },
    },
    {
      name: 'no-src-to-test-or-bench',
      severity: 'error',
      comment: 'Product code never imports test or benchmark code.',
      from: { path: '^src/' },
      to: { path: '^(test|bench)/' },
    },
    {
      name: 'no-unlayered-importer',
      severity: 'error',
      comment: 'Every module of src/ belongs to a layer above (add the folder to LAYERS in .dependency-cruiser.cjs).',
      from: { path: '^src/', pathNot: anyLayer },
      to: { path: '^src/' },
    },
    {
      name: 'no-unlayered-import',
      severity: 'error',
      comment: 'Every module of src/ belongs to a layer above (add the folder to LAYERS in .dependency-cruiser.cjs).',
      from: { path: '^src/' },
      to: { path: '^src/', pathNot: anyLayer },
    },
    {
      name: 'engine-sees-only-interfaces',
      severity: 'error',
      comment:
        'Sender and Receiver see a Volume and a Session only: no concrete volume class or volume factory, no ws, no state file, no config (docs/architecture.md, "The mirror engine").',
      from: { path: '^src/mirror/(sender|receiver)\\.ts$' },
      to: { path: ['^src/volume/(sparse-file|block-device|handle-volume|memory|factory)\\.ts$', '^src/wire/(transport|memory)\\.ts$', '^src/mirror/(state|settings|mirror|context)\\.ts$', '^src/daemon/', '(^|/)node_modules/ws/'] },
    },
    {
      name: 'no-unresolvable',
      severity: 'error',
      comment: 'An import that does not resolve escapes every rule above (and would fail at run time).',
      from: { path: '^src/' },
      to: { couldNotResolve: true },
    },
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    moduleSystems: ['es6', 'cjs'],
    // `import type` and type-only names are layer dependencies too.
    tsPreCompilationDeps: true,
    tsConfig: { fileName: 'tsconfig.json' },
    enhancedResolveOptions: {
      exportsFields: ['exports'],
      conditionNames: ['import', 'require', 'node', 'default', 'types'],
      // No extensionAlias here: the config schema refuses it. dependency-cruiser
      // resolves a TypeScript import of `./x.js` to ./x.ts itself when no x.js
      // exists (as tsc does; sverweij/dependency-cruiser#364); the no-unresolvable
      // rule below fails loudly if that ever stops working.
    },
    skipAnalysisNotInRules: true,
  },
};
