/*
 * Chunk digests on the threadpool (src/volume/digest.ts): for each chunk of
 * a buffer, 16 bytes that are all zero when the chunk reads as zeros, else
 * SHA-256 of the chunk truncated to 16 bytes, with byte 0 set to 1 should the
 * truncation be all zero. The same bytes as chunkDigest() in digest.ts (the
 * unit tests compare them). SHA-256 is Node's own OpenSSL (SHA-NI where the
 * CPU has it), as in gmac.c.
 */
#include <openssl/evp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "digest.h"
#include "payload.h"

#define DIGEST_BYTES 16

struct digest_work {
  struct tm_job job; /* first: the buffers are kept alive while the threadpool uses them */
  const uint8_t *buf;
  size_t len;
  size_t chunk;
  uint8_t *out;
  int failed;
};

static int all_zero(const uint8_t *p, size_t n) {
  static const uint8_t zeros[4096];
  if (n == 0) return 1;
  if (p[0] != 0 || p[n - 1] != 0) return 0;
  while (n > 0) {
    size_t k = n < sizeof zeros ? n : sizeof zeros;
    if (memcmp(p, zeros, k) != 0) return 0;
    p += k;
    n -= k;
  }
  return 1;
}

static void digest_execute(napi_env env, void *data) {
  struct digest_work *w = data;
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  if (!ctx) {
    w->failed = 1;
    return;
  }
  const EVP_MD *md = EVP_sha256();
  uint8_t full[EVP_MAX_MD_SIZE];
  for (size_t at = 0, i = 0; at < w->len; at += w->chunk, i++) {
    size_t n = w->len - at < w->chunk ? w->len - at : w->chunk;
    uint8_t *d = w->out + i * DIGEST_BYTES;
    if (all_zero(w->buf + at, n)) {
      memset(d, 0, DIGEST_BYTES);
      continue;
    }
    unsigned int got = 0;
    if (EVP_DigestInit_ex(ctx, md, NULL) != 1 || EVP_DigestUpdate(ctx, w->buf + at, n) != 1 || EVP_DigestFinal_ex(ctx, full, &got) != 1 || got < DIGEST_BYTES) {
      w->failed = 1;
      break;
    }
    memcpy(d, full, DIGEST_BYTES);
    if (all_zero(d, DIGEST_BYTES)) d[0] = 1;
  }
  EVP_MD_CTX_free(ctx);
}

static void digest_complete(napi_env env, napi_status status, void *data) {
  struct digest_work *w = data;
  napi_value undef;
  napi_get_undefined(env, &undef);
  tm_job_finish(env, &w->job, undef, status != napi_ok ? "chunkDigests was cancelled" : w->failed ? "chunkDigests: OpenSSL failed to compute SHA-256" : NULL);
}

napi_value ChunkDigests(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint8_t *buf, *out;
  size_t len, olen;
  double chunk;
  if (argc < 3 || !tm_u8_array(env, argv[0], &buf, &len) || napi_get_value_double(env, argv[1], &chunk) != napi_ok || !tm_u8_array(env, argv[2], &out, &olen)) {
    napi_throw_type_error(env, NULL, "chunkDigests(buf: Uint8Array, chunkSize: number, out: Uint8Array)");
    return NULL;
  }
  if (!(chunk >= 1 && chunk <= (double)(1u << 30) && chunk == (double)(size_t)chunk)) {
    napi_throw_range_error(env, NULL, "chunkDigests: chunkSize must be an integer from 1 to 2^30");
    return NULL;
  }
  size_t cs = (size_t)chunk;
  size_t chunks = len / cs + (len % cs != 0);
  if (olen != chunks * DIGEST_BYTES) {
    napi_throw_range_error(env, NULL, "chunkDigests: out must hold 16 bytes per chunk of buf");
    return NULL;
  }
  if (len && olen && buf < out + olen && out < buf + len) {
    napi_throw_range_error(env, NULL, "chunkDigests: buf and out overlap");
    return NULL;
  }
  struct digest_work *w = calloc(1, sizeof *w);
  if (!w) {
    napi_throw_error(env, "ENOMEM", "chunkDigests: out of memory");
    return NULL;
  }
  w->buf = buf;
  w->len = len;
  w->chunk = cs;
  w->out = out;
  return tm_job_start(env, &w->job, argv[0], argv[2], "thinmirror.chunkDigests", digest_execute, digest_complete);
}
