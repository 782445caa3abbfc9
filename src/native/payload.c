/*
 * Payload codec of the wire protocol (docs/protocol.md, `extent`):
 *   crc32c(buf)                  CRC-32C (Castagnoli) of buf: SSE4.2 instruction when the
 *                                CPU has it, slicing-by-8 tables otherwise
 *   crc32cPortable(buf)          the table version always (tests compare the two)
 *   lz4CompressCrc(src, dst)     Promise<[n, crc]> on the threadpool: crc = CRC-32C of src;
 *                                dst = uint32 LE length of src + one LZ4 block, n = its
 *                                bytes, or 0 when that would not be smaller than src
 *   lz4DecompressInto(src, dst)  one LZ4 block -> dst: bytes written, -1 if malformed
 * LZ4 is the upstream library (vendor/lz4, 1.9.4, BSD-2-Clause): LZ4_compress_default
 * and LZ4_decompress_safe, which never reads or writes outside the given buffers.
 */
#include "payload.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vendor/lz4/lz4.h"

/* ---- CRC-32C, reflected polynomial 0x82F63B78 ---- */

static uint32_t table[8][256];
static int have_sse42;

static void crc32c_tables(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
    table[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; i++) {
    for (int t = 1; t < 8; t++) table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
  }
}

static uint32_t crc32c_sw(uint32_t c, const uint8_t *p, size_t n) {
  while (n && ((uintptr_t)p & 7)) {
    c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
    n--;
  }
  while (n >= 8) {
    uint32_t lo, hi;
    memcpy(&lo, p, 4);
    memcpy(&hi, p + 4, 4);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    lo = __builtin_bswap32(lo);
    hi = __builtin_bswap32(hi);
#endif
    lo ^= c;
    c = table[7][lo & 0xff] ^ table[6][(lo >> 8) & 0xff] ^ table[5][(lo >> 16) & 0xff] ^ table[4][lo >> 24] ^
        table[3][hi & 0xff] ^ table[2][(hi >> 8) & 0xff] ^ table[1][(hi >> 16) & 0xff] ^ table[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
  return c;
}

/*
 * Shifting a CRC register over runs of zero bytes (GF(2) matrices, after
 * Mark Adler's crc32c.c): crc32c_shift(zeros_long, c) is c advanced over
 * LONG zero bytes. It joins CRCs computed side by side over consecutive
 * blocks: crc(A || B) = shift_len(B)(crc(A)) ^ crc_from_0(B).
 */
#define LONG 8192
#define SHORT 256
static uint32_t zeros_long[4][256];
static uint32_t zeros_short[4][256];

static uint32_t gf2_times(const uint32_t *mat, uint32_t vec) {
  uint32_t sum = 0;
  for (; vec; vec >>= 1, mat++)
    if (vec & 1) sum ^= *mat;
  return sum;
}

static void gf2_square(uint32_t *square, const uint32_t *mat) {
  for (int n = 0; n < 32; n++) square[n] = gf2_times(mat, mat[n]);
}

/* The operator that advances a register over `len` zero bytes (len a power of two). */
static void zeros_op(uint32_t *even, size_t len) {
  uint32_t odd[32];
  odd[0] = 0x82F63B78u; /* one zero bit */
  uint32_t row = 1;
  for (int n = 1; n < 32; n++, row <<= 1) odd[n] = row;
  gf2_square(even, odd); /* two zero bits */
  gf2_square(odd, even); /* four: one zero byte has eight */
  do {
    gf2_square(even, odd);
    len >>= 1;
    if (len == 0) return;
    gf2_square(odd, even);
    len >>= 1;
  } while (len);
  memcpy(even, odd, sizeof odd);
}

static void zeros_table(uint32_t zeros[4][256], size_t len) {
  uint32_t op[32];
  zeros_op(op, len);
  for (uint32_t n = 0; n < 256; n++) {
    zeros[0][n] = gf2_times(op, n);
    zeros[1][n] = gf2_times(op, n << 8);
    zeros[2][n] = gf2_times(op, n << 16);
    zeros[3][n] = gf2_times(op, n << 24);
  }
}

static inline uint64_t shift(uint32_t zeros[4][256], uint64_t c) {
  return zeros[0][c & 0xff] ^ zeros[1][(c >> 8) & 0xff] ^ zeros[2][(c >> 16) & 0xff] ^ zeros[3][(c >> 24) & 0xff];
}

#if defined(__x86_64__)
/*
 * The SSE4.2 crc32 instruction has a latency of three cycles and a throughput
 * of one per cycle: three independent streams over three consecutive blocks
 * (LONG, then SHORT bytes each), joined by shifting, run about three times as
 * fast as one stream.
 */
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t c, const uint8_t *p, size_t n) {
  uint64_t c0 = c, c1, c2;
  while (n && ((uintptr_t)p & 7)) {
    c0 = __builtin_ia32_crc32qi((uint32_t)c0, *p++);
    n--;
  }
  for (size_t block = LONG; block >= SHORT; block = block == LONG ? SHORT : 0) {
    uint32_t(*zeros)[256] = block == LONG ? zeros_long : zeros_short;
    while (n >= 3 * block) {
      c1 = c2 = 0;
      const uint8_t *end = p + block;
      do {
        uint64_t v0, v1, v2;
        memcpy(&v0, p, 8);
        memcpy(&v1, p + block, 8);
        memcpy(&v2, p + 2 * block, 8);
        c0 = __builtin_ia32_crc32di(c0, v0);
        c1 = __builtin_ia32_crc32di(c1, v1);
        c2 = __builtin_ia32_crc32di(c2, v2);
        p += 8;
      } while (p < end);
      c0 = shift(zeros, c0) ^ c1;
      c0 = shift(zeros, c0) ^ c2;
      p += 2 * block;
      n -= 3 * block;
    }
  }
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    c0 = __builtin_ia32_crc32di(c0, v);
    p += 8;
    n -= 8;
  }
  while (n--) c0 = __builtin_ia32_crc32qi((uint32_t)c0, *p++);
  return (uint32_t)c0;
}
#endif

uint32_t tm_crc32c(const uint8_t *p, size_t n) {
#if defined(__x86_64__)
  if (have_sse42) return ~crc32c_hw(~0u, p, n);
#endif
  return ~crc32c_sw(~0u, p, n);
}

static void payload_init_once(void) {
  crc32c_tables();
  zeros_table(zeros_long, LONG);
  zeros_table(zeros_short, SHORT);
#if defined(__x86_64__)
  __builtin_cpu_init();
  have_sse42 = __builtin_cpu_supports("sse4.2");
#endif
}

/* Called by every Init (the main thread and any worker); the tables are built once. */
void tm_payload_init(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, payload_init_once);
}

/* ---- JS bindings ---- */

int tm_u8_array(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  bool is;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is) return 0;
  napi_typedarray_type t;
  void *p;
  if (napi_get_typedarray_info(env, v, &t, len, &p, NULL, NULL) != napi_ok || t != napi_uint8_array) return 0;
  *data = p;
  return 1;
}

static napi_value u32(napi_env env, uint32_t v) {
  napi_value r;
  napi_create_uint32(env, v, &r);
  return r;
}

static napi_value crc_common(napi_env env, napi_callback_info info, int portable) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint8_t *p;
  size_t n;
  if (argc < 1 || !tm_u8_array(env, argv[0], &p, &n)) {
    napi_throw_type_error(env, NULL, "crc32c(buf: Uint8Array)");
    return NULL;
  }
  return u32(env, portable ? ~crc32c_sw(~0u, p, n) : tm_crc32c(p, n));
}

napi_value Crc32c(napi_env env, napi_callback_info info) { return crc_common(env, info, 0); }
napi_value Crc32cPortable(napi_env env, napi_callback_info info) { return crc_common(env, info, 1); }

napi_value tm_job_start(napi_env env, struct tm_job *job, napi_value buf0, napi_value buf1, const char *name, napi_async_execute_callback execute, napi_async_complete_callback complete) {
  napi_create_reference(env, buf0, 1, &job->refs[0]);
  napi_create_reference(env, buf1, 1, &job->refs[1]);
  napi_value promise, resource;
  napi_create_promise(env, &job->deferred, &promise);
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource);
  napi_create_async_work(env, NULL, resource, execute, complete, job, &job->work);
  napi_queue_async_work(env, job->work);
  return promise;
}

void tm_job_finish(napi_env env, struct tm_job *job, napi_value value, const char *error) {
  if (error) {
    napi_value msg, err;
    napi_create_string_utf8(env, error, NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &err);
    napi_reject_deferred(env, job->deferred, err);
  } else {
    napi_resolve_deferred(env, job->deferred, value);
  }
  napi_delete_reference(env, job->refs[0]);
  napi_delete_reference(env, job->refs[1]);
  napi_delete_async_work(env, job->work);
  free(job);
}

struct lz4_work {
  struct tm_job job; /* first: the buffers are kept alive while the threadpool uses them */
  const uint8_t *src;
  size_t slen;
  uint8_t *dst;
  size_t dlen;
  int n;
  uint32_t crc;
};

enum { LZ4_PREFIX = 4 };

static void lz4_execute(napi_env env, void *data) {
  struct lz4_work *w = data;
  w->crc = tm_crc32c(w->src, w->slen);
  w->n = 0;
  /* Kept only when prefix + block < slen: give LZ4 no more room than that. */
  if (w->slen <= LZ4_PREFIX + 1 || w->slen > LZ4_MAX_INPUT_SIZE || w->dlen <= LZ4_PREFIX) return;
  size_t room = w->dlen - LZ4_PREFIX;
  if (room > w->slen - LZ4_PREFIX - 1) room = w->slen - LZ4_PREFIX - 1;
  int c = LZ4_compress_default((const char *)w->src, (char *)w->dst + LZ4_PREFIX, (int)w->slen, (int)room);
  if (c <= 0) return;
  uint32_t len = (uint32_t)w->slen;
  w->dst[0] = len & 0xff;
  w->dst[1] = (len >> 8) & 0xff;
  w->dst[2] = (len >> 16) & 0xff;
  w->dst[3] = (len >> 24) & 0xff;
  w->n = c + LZ4_PREFIX;
}

static void lz4_complete(napi_env env, napi_status status, void *data) {
  struct lz4_work *w = data;
  napi_value r = NULL;
  if (status == napi_ok) {
    napi_create_array_with_length(env, 2, &r);
    napi_set_element(env, r, 0, u32(env, (uint32_t)w->n));
    napi_set_element(env, r, 1, u32(env, w->crc));
  }
  tm_job_finish(env, &w->job, r, status == napi_ok ? NULL : "lz4CompressCrc was cancelled");
}

/* (src: Uint8Array, dst: Uint8Array) arguments; throws a TypeError naming `usage` and returns 0 when they are not. */
static int src_dst(napi_env env, napi_callback_info info, const char *usage, napi_value argv[2], uint8_t **src, size_t *slen, uint8_t **dst, size_t *dlen) {
  size_t argc = 2;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 2 || !tm_u8_array(env, argv[0], src, slen) || !tm_u8_array(env, argv[1], dst, dlen)) {
    napi_throw_type_error(env, NULL, usage);
    return 0;
  }
  return 1;
}

napi_value Lz4CompressCrc(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  uint8_t *src, *dst;
  size_t slen, dlen;
  if (!src_dst(env, info, "lz4CompressCrc(src: Uint8Array, dst: Uint8Array)", argv, &src, &slen, &dst, &dlen)) return NULL;
  if ((src < dst + dlen && dst < src + slen) && slen && dlen) {
    napi_throw_range_error(env, NULL, "lz4CompressCrc: src and dst overlap");
    return NULL;
  }
  struct lz4_work *w = calloc(1, sizeof *w);
  if (!w) {
    napi_throw_error(env, "ENOMEM", "lz4CompressCrc: out of memory");
    return NULL;
  }
  w->src = src;
  w->slen = slen;
  w->dst = dst;
  w->dlen = dlen;
  return tm_job_start(env, &w->job, argv[0], argv[1], "thinmirror.lz4CompressCrc", lz4_execute, lz4_complete);
}

napi_value Lz4DecompressInto(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  uint8_t *src, *dst;
  size_t slen, dlen;
  if (!src_dst(env, info, "lz4DecompressInto(src: Uint8Array, dst: Uint8Array)", argv, &src, &slen, &dst, &dlen)) return NULL;
  napi_value r;
  if (slen == 0 || slen > (size_t)LZ4_MAX_INPUT_SIZE) {
    napi_create_int32(env, -1, &r);
    return r;
  }
  int cap = dlen > (size_t)LZ4_MAX_INPUT_SIZE ? LZ4_MAX_INPUT_SIZE : (int)dlen;
  int n = LZ4_decompress_safe((const char *)src, (char *)dst, (int)slen, cap);
  napi_create_int32(env, n < 0 ? -1 : n, &r);
  return r;
}
