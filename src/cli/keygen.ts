import { KEYGEN_BYTES, writeKeyFile } from '../daemon/psk.js';

/**
 * `keygen FILE [--force]`: write a new pre-shared key file (32 random bytes,
 * base64, mode 0600) for `auth.pskFile`; an existing FILE is refused unless
 * `force`. The key itself is never printed.
 */
export async function runKeygen(file: string, force: boolean): Promise<number> {
  await writeKeyFile(file, { force });
  console.log(`${file}: a new ${KEYGEN_BYTES}-byte key (base64, mode 0600); copy this file to the other host and name it in auth.pskFile on both`);
  return 0;
}
