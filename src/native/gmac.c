/*
 * The frame MAC of protocol v3 (docs/protocol.md, "Frame integrity"): GMAC,
 * the 16-byte tag of AES-256-GCM under the session key with the nonce
 * dir || 0 0 0 || u64be(seq), the frame as additional data and nothing
 * encrypted. The same tag as Node's createCipheriv('aes-256-gcm') gives (the
 * unit tests compare them), without its cost per call: the key schedule is
 * made once per session key, not once per frame, and no JS stream object is
 * built. OpenSSL is Node's own (the addon links against the symbols Node
 * exports for addons).
 */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <stdlib.h>

#include "gmac.h"

#define TAG_BYTES 16
/* EVP_EncryptUpdate takes an int length: longer frames go in pieces of this. */
#define AAD_PIECE (1 << 30)

typedef struct {
  EVP_CIPHER_CTX *ctx;
} gmac_key;

static void finalize_key(napi_env env, void *data, void *hint) {
  gmac_key *k = data;
  EVP_CIPHER_CTX_free(k->ctx);
  free(k);
}

static napi_value type_error(napi_env env, const char *msg) {
  napi_throw_type_error(env, NULL, msg);
  return NULL;
}

napi_value GmacKey(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  void *key;
  size_t len;
  if (argc < 1 || napi_get_buffer_info(env, argv[0], &key, &len) != napi_ok || len != 32) return type_error(env, "gmacKey: the key must be a Buffer of 32 bytes");
  gmac_key *k = malloc(sizeof *k);
  if (!k) return type_error(env, "gmacKey: out of memory");
  k->ctx = EVP_CIPHER_CTX_new();
  if (!k->ctx || EVP_EncryptInit_ex(k->ctx, EVP_aes_256_gcm(), NULL, key, NULL) != 1) {
    if (k->ctx) EVP_CIPHER_CTX_free(k->ctx);
    free(k);
    napi_throw_error(env, "ERR_TM_GMAC", "gmacKey: OpenSSL refused the AES-256-GCM key");
    return NULL;
  }
  napi_value r;
  napi_create_external(env, k, finalize_key, NULL, &r);
  return r;
}

/* Reads (handle, dir, seq, frame) from argv; 0 and a thrown TypeError when one is wrong. */
static int args(napi_env env, napi_value *argv, gmac_key **k, uint8_t *dir, int64_t *seq, const uint8_t **data, size_t *len) {
  uint32_t d;
  void *p;
  if (napi_get_value_external(env, argv[0], (void **)k) != napi_ok || !*k) return type_error(env, "gmac: the first argument must be a gmacKey handle"), 0;
  if (napi_get_value_uint32(env, argv[1], &d) != napi_ok || d > 255) return type_error(env, "gmac: dir must be a byte"), 0;
  if (napi_get_value_int64(env, argv[2], seq) != napi_ok || *seq < 0) return type_error(env, "gmac: seq must be a non-negative integer"), 0;
  if (napi_get_buffer_info(env, argv[3], &p, len) != napi_ok) return type_error(env, "gmac: the frame must be a Buffer"), 0;
  *dir = (uint8_t)d;
  *data = p;
  return 1;
}

/* Feeds `len` bytes at `data` to the GCM context as additional data (OpenSSL takes AAD in several updates). */
static int aad(gmac_key *k, const uint8_t *data, size_t len) {
  int outl;
  for (size_t at = 0; at < len; at += AAD_PIECE) {
    size_t n = len - at < AAD_PIECE ? len - at : AAD_PIECE;
    if (EVP_EncryptUpdate(k->ctx, NULL, &outl, data + at, (int)n) != 1) return 0;
  }
  return 1;
}

/* The tag of the frame data || data2 (data2 may be NULL: the frame is data alone). */
static int compute(gmac_key *k, uint8_t dir, int64_t seq, const uint8_t *data, size_t len, const uint8_t *data2, size_t len2, uint8_t tag[TAG_BYTES]) {
  uint8_t iv[12] = {0};
  iv[0] = dir;
  for (int i = 0; i < 8; i++) iv[4 + i] = (uint8_t)((uint64_t)seq >> (56 - 8 * i));
  int outl;
  uint8_t none[16];
  if (EVP_EncryptInit_ex(k->ctx, NULL, NULL, NULL, iv) != 1) return 0;
  if (!aad(k, data, len) || (data2 && !aad(k, data2, len2))) return 0;
  if (EVP_EncryptFinal_ex(k->ctx, none, &outl) != 1) return 0;
  return EVP_CIPHER_CTX_ctrl(k->ctx, EVP_CTRL_GCM_GET_TAG, TAG_BYTES, tag) == 1;
}

/*
 * The tag of (handle, dir, seq, frame) in argv[0..3] of a call with at least
 * `want` arguments (argv holds `want`; with `second`, the last one is optional
 * and, when given, the frame's second part: N-API fills missing arguments
 * with undefined); 0 with an exception pending when the arguments are wrong
 * or OpenSSL fails.
 */
static int tag_of_call(napi_env env, napi_callback_info info, size_t want, int second, napi_value *argv, const char *usage, uint8_t tag[TAG_BYTES]) {
  size_t argc = want;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < want - (second ? 1 : 0)) return type_error(env, usage), 0;
  gmac_key *k;
  uint8_t dir;
  int64_t seq;
  const uint8_t *data;
  size_t len;
  if (!args(env, argv, &k, &dir, &seq, &data, &len)) return 0;
  const uint8_t *data2 = NULL;
  size_t len2 = 0;
  if (second) {
    /* gmacTag's optional fifth argument: the frame's second part (its data payload, sent without a copy). */
    napi_valuetype t;
    napi_typeof(env, argv[4], &t);
    if (t != napi_undefined) {
      void *p;
      if (napi_get_buffer_info(env, argv[4], &p, &len2) != napi_ok) return type_error(env, "gmacTag: the frame's second part must be a Buffer"), 0;
      data2 = p;
    }
  }
  if (!compute(k, dir, seq, data, len, data2, len2, tag)) {
    napi_throw_error(env, "ERR_TM_GMAC", "gmac: OpenSSL failed");
    return 0;
  }
  return 1;
}

napi_value GmacTag(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  uint8_t tag[TAG_BYTES];
  if (!tag_of_call(env, info, 5, 1, argv, "gmacTag(handle, dir, seq, frame[, frame2])", tag)) return NULL;
  napi_value r;
  if (napi_create_buffer_copy(env, TAG_BYTES, tag, NULL, &r) != napi_ok) return NULL;
  return r;
}

napi_value GmacVerify(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  uint8_t tag[TAG_BYTES];
  if (!tag_of_call(env, info, 5, 0, argv, "gmacVerify(handle, dir, seq, frame, tag)", tag)) return NULL;
  void *got;
  size_t glen;
  if (napi_get_buffer_info(env, argv[4], &got, &glen) != napi_ok) return type_error(env, "gmacVerify: the tag must be a Buffer");
  napi_value r;
  napi_get_boolean(env, glen == TAG_BYTES && CRYPTO_memcmp(tag, got, TAG_BYTES) == 0, &r);
  return r;
}
