/*
 * Batched positional I/O: one threadpool job preads (or pwrites) a whole list
 * of pieces of a file, where fs.read / fs.write cost one threadpool round
 * trip per piece.
 *   preadPieces(fd, positions, lengths, into)   piece i: lengths[i] bytes at file offset positions[i] into `into`
 *                                               at the sum of the lengths before it (packed one after the other)
 *   pwritePieces(fd, positions, lengths, data)  piece i: the next lengths[i] bytes of `data` to file offset positions[i]
 * positions and lengths are Float64Arrays of non-negative integers (copied at
 * the call: changing them afterwards changes nothing); `into` / `data` is a
 * Uint8Array held by a reference until the job completes and must not be used
 * meanwhile. Short transfers and EINTR are retried. An errno failure rejects
 * with thinmirror.c's error (code "E...", errno, syscall "pread" / "pwrite")
 * plus `position`, the file offset it failed at; a read that meets the end of
 * the file before its piece is complete rejects with code "EOF_SHORT" (same
 * `syscall` and `position`). Bad arguments throw a TypeError (types) or a
 * RangeError (values) synchronously.
 */
#include <errno.h>
#include <inttypes.h>
#include <node_api.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pieces.h"

/* At most this many pieces per call. */
#define MAX_PIECES (1u << 20)
/* Offsets and lengths are JS numbers: exact up to 2^53. */
#define MAX_SAFE 9007199254740992.0

struct pieces_work {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref buf_ref; /* keeps `into` / `data` alive while the threadpool uses it */
  int write;
  int fd;
  size_t count;
  int64_t *pos, *len; /* copies of positions and lengths */
  uint8_t *buf;
  int err;            /* errno, or -1: end of file before the piece was complete */
  int64_t fail_at;    /* file offset of the failure */
  size_t fail_piece;
};

static void pieces_execute(napi_env env, void *data) {
  struct pieces_work *w = data;
  uint8_t *p = w->buf;
  for (size_t i = 0; i < w->count; i++) {
    int64_t off = w->pos[i];
    size_t len = (size_t)w->len[i], done = 0;
    while (done < len) {
      ssize_t r = w->write ? pwrite(w->fd, p + done, len - done, (off_t)(off + (int64_t)done))
                           : pread(w->fd, p + done, len - done, (off_t)(off + (int64_t)done));
      if (r < 0) {
        if (errno == EINTR) continue;
        w->err = errno;
      } else if (r == 0) {
        /* pread: end of file. pwrite of a positive count does not return 0 on a file; never loop on it. */
        w->err = w->write ? EIO : -1;
      } else {
        done += (size_t)r;
        continue;
      }
      w->fail_at = off + (int64_t)done;
      w->fail_piece = i;
      return;
    }
    p += len;
  }
}

static void pieces_complete(napi_env env, napi_status status, void *data) {
  struct pieces_work *w = data;
  const char *syscall = w->write ? "pwrite" : "pread";
  if (status == napi_ok && w->err == 0) {
    napi_value undef;
    napi_get_undefined(env, &undef);
    napi_resolve_deferred(env, w->deferred, undef);
  } else {
    napi_value error, v;
    if (status == napi_ok && w->err == -1) {
      char msg[256];
      snprintf(msg, sizeof msg, "pread: end of file at offset %" PRId64 ", piece %zu (%" PRId64 "+%" PRId64 ") is %" PRId64 " bytes short",
               w->fail_at, w->fail_piece, w->pos[w->fail_piece], w->len[w->fail_piece],
               w->pos[w->fail_piece] + w->len[w->fail_piece] - w->fail_at);
      napi_value jmsg, jcode;
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &jmsg);
      napi_create_string_utf8(env, "EOF_SHORT", NAPI_AUTO_LENGTH, &jcode);
      napi_create_error(env, jcode, jmsg, &error);
      napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &v);
      napi_set_named_property(env, error, "syscall", v);
    } else {
      error = tm_make_error(env, syscall, status == napi_ok && w->err > 0 ? w->err : EIO);
    }
    napi_create_double(env, (double)w->fail_at, &v);
    napi_set_named_property(env, error, "position", v);
    napi_reject_deferred(env, w->deferred, error);
  }
  napi_delete_reference(env, w->buf_ref);
  napi_delete_async_work(env, w->work);
  free(w->pos);
  free(w->len);
  free(w);
}

/* A typed array argument of the given type: its data and element count; 0 when it is not one. */
static int typed(napi_env env, napi_value v, napi_typedarray_type want, void **data, size_t *n) {
  bool is;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is) return 0;
  napi_typedarray_type t;
  napi_value ab;
  size_t off;
  if (napi_get_typedarray_info(env, v, &t, n, data, &ab, &off) != napi_ok || t != want) return 0;
  return 1;
}

static napi_value start_pieces(napi_env env, napi_callback_info info, int write) {
  const char *usage = write ? "pwritePieces(fd: number, positions: Float64Array, lengths: Float64Array, data: Uint8Array)"
                            : "preadPieces(fd: number, positions: Float64Array, lengths: Float64Array, into: Uint8Array)";
  const char *fn = write ? "pwritePieces" : "preadPieces";
  char msg[256];
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  napi_valuetype t = napi_undefined;
  if (argc >= 1) napi_typeof(env, argv[0], &t);
  void *pos_data, *len_data, *buf;
  size_t npos, nlen, nbuf;
  if (argc < 4 || t != napi_number || !typed(env, argv[1], napi_float64_array, &pos_data, &npos) ||
      !typed(env, argv[2], napi_float64_array, &len_data, &nlen) || !typed(env, argv[3], napi_uint8_array, &buf, &nbuf)) {
    napi_throw_type_error(env, NULL, usage);
    return NULL;
  }
  double fd;
  napi_get_value_double(env, argv[0], &fd);
  if (!(fd >= 0 && fd <= 2147483647.0 && fd == (double)(int)fd)) {
    snprintf(msg, sizeof msg, "%s: fd must be a non-negative integer", fn);
    napi_throw_range_error(env, NULL, msg);
    return NULL;
  }
  if (npos != nlen) {
    snprintf(msg, sizeof msg, "%s: %zu positions but %zu lengths", fn, npos, nlen);
    napi_throw_range_error(env, NULL, msg);
    return NULL;
  }
  if (npos > MAX_PIECES) {
    snprintf(msg, sizeof msg, "%s: %zu pieces, at most %u in one call", fn, npos, MAX_PIECES);
    napi_throw_range_error(env, NULL, msg);
    return NULL;
  }
  struct pieces_work *w = calloc(1, sizeof *w);
  if (w) {
    w->pos = malloc((npos ? npos : 1) * sizeof(int64_t));
    w->len = malloc((npos ? npos : 1) * sizeof(int64_t));
  }
  if (!w || !w->pos || !w->len) {
    if (w) {
      free(w->pos);
      free(w->len);
      free(w);
    }
    napi_throw_error(env, "ENOMEM", write ? "pwritePieces: out of memory" : "preadPieces: out of memory");
    return NULL;
  }
  const double *pd = pos_data, *ld = len_data;
  uint64_t total = 0;
  for (size_t i = 0; i < npos; i++) {
    double p = pd[i], l = ld[i];
    /* NaN fails every comparison. */
    if (!(p >= 0 && p <= MAX_SAFE && p == (double)(int64_t)p && l >= 0 && l <= MAX_SAFE && l == (double)(int64_t)l)) {
      snprintf(msg, sizeof msg, "%s: piece %zu (%g+%g) is not a non-negative integer offset and length", fn, i, p, l);
      goto range;
    }
    w->pos[i] = (int64_t)p;
    w->len[i] = (int64_t)l;
    total += (uint64_t)w->len[i];
    if (total > nbuf) {
      snprintf(msg, sizeof msg, "%s: the lengths add up to more than the %zu bytes of %s", fn, nbuf, write ? "data" : "into");
      goto range;
    }
  }
  w->write = write;
  w->fd = (int)fd;
  w->count = npos;
  w->buf = buf;
  napi_create_reference(env, argv[3], 1, &w->buf_ref);
  napi_value promise, name;
  napi_create_promise(env, &w->deferred, &promise);
  napi_create_string_utf8(env, write ? "thinmirror.pwritePieces" : "thinmirror.preadPieces", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, pieces_execute, pieces_complete, w, &w->work);
  napi_queue_async_work(env, w->work);
  return promise;

range:
  free(w->pos);
  free(w->len);
  free(w);
  napi_throw_range_error(env, NULL, msg);
  return NULL;
}

napi_value PreadPieces(napi_env env, napi_callback_info info) { return start_pieces(env, info, 0); }
napi_value PwritePieces(napi_env env, napi_callback_info info) { return start_pieces(env, info, 1); }
