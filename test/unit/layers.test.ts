import { expect } from 'chai';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cruise, type ICruiseResult, type IViolation } from 'dependency-cruiser';
import extractDepcruiseOptions from 'dependency-cruiser/config-utl/extract-depcruise-options';
import extractTSConfig from 'dependency-cruiser/config-utl/extract-ts-config';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
/** A tree that breaks the rules on purpose (see the comment in each of its files). */
const FIXTURE = path.join(ROOT, 'test', 'fixtures', 'layers');

/**
 * Cruise `<baseDir>/src` with the repository's .dependency-cruiser.cjs (what
 * `npm run lint:layers` runs); module names in the result are relative to
 * `baseDir`, so the rules' `^src/...` paths apply to the fixture tree too.
 */
async function cruiseLayers(baseDir: string): Promise<ICruiseResult> {
  const tsConfigFile = path.join(ROOT, 'tsconfig.json');
  const options = await extractDepcruiseOptions(path.join(ROOT, '.dependency-cruiser.cjs'));
  const reporting = await cruise(['src'], { ...options, baseDir, tsConfig: { fileName: tsConfigFile } }, {}, { tsConfig: extractTSConfig(tsConfigFile) });
  if (typeof reporting.output === 'string') throw new Error(`dependency-cruiser returned text, not a result: ${reporting.output}`);
  return reporting.output;
}

/** `rule: from → to`; a cycle is named by its members, whichever edge of it the cruise reports. */
function describeViolation(v: IViolation): string {
  if (v.cycle) return `${v.rule.name}: ${[...new Set([v.from, ...v.cycle.map((c) => c.name)])].sort().join(' ⇄ ')}`;
  return `${v.rule.name}: ${v.from} → ${v.to}`;
}

describe('layers (.dependency-cruiser.cjs)', function () {
  this.timeout(60_000);

  it('src/ has no layer violations, cycles, unlayered or unresolvable imports', async () => {
    const result = await cruiseLayers(ROOT);
    // The cruise must have resolved the `.js` specifiers to .ts files, or every rule would pass vacuously.
    const cli = result.modules.find((m) => m.source === 'src/cli.ts');
    expect(cli?.dependencies.map((d) => d.resolved), 'src/cli.ts resolved its imports').to.include('src/errors.ts');
    const violations = result.summary.violations.map(describeViolation);
    expect(violations, `${violations.length} violation(s) of the layering of src/ (rule: from → to):\n  ${violations.join('\n  ')}\n`).to.deep.equal([]);
  });

  it('reports exactly the violations planted in test/fixtures/layers', async () => {
    const result = await cruiseLayers(FIXTURE);
    // Exactly these: the type-only import counts, the `.js` specifiers resolve (else no-unresolvable), the clean files pass.
    expect(result.summary.violations.map(describeViolation).sort()).to.deep.equal([
      'engine-sees-only-interfaces: src/mirror/sender.ts → src/volume/sparse-file.ts',
      'no-circular: src/wire/ping.ts ⇄ src/wire/pong.ts',
      'no-upward-mirror-to-daemon: src/mirror/uses-daemon.ts → src/daemon/owner.ts',
      'no-upward-volume-to-mirror: src/volume/uses-mirror.ts → src/mirror/uses-daemon.ts',
    ]);
  });
});
