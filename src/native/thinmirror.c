/*
 * thinmirror's N-API addon: the system calls Node does not offer.
 *   seekData(fd, offset) / seekHole(fd, offset)  lseek SEEK_DATA / SEEK_HOLE; -1 on ENXIO
 *   seekMap(fd, from, to, maxRanges)             the same over [from, to) on the threadpool (Promise): Float64Array,
 *                                                start and end of each allocated range, at most maxRanges
 *   punchHole(fd, offset, length)                fallocate PUNCH_HOLE|KEEP_SIZE   (Promise, threadpool)
 *   zeroRange(fd, offset, length)                fallocate ZERO_RANGE|KEEP_SIZE   (Promise, threadpool)
 *   blkGetSize64(fd)                             ioctl BLKGETSIZE64
 *   blkDiscard(fd, offset, length)               ioctl BLKDISCARD                 (Promise, threadpool)
 *   ficlone(destFd, srcFd)                       ioctl FICLONE: destFd shares srcFd's extents (Promise, threadpool)
 *   fiemap(fd, offset, length, sync)             ioctl FS_IOC_FIEMAP, FIEMAP_FLAG_SYNC if sync (Promise, threadpool):
 *                                                Float64Array, 4 numbers per extent: logical, physical, length, flags
 *   sdNotify(socketPath, message)                sd_notify(3): one datagram to the NOTIFY_SOCKET path ("@" = abstract);
 *                                                false when socketPath is empty
 * Also exported here, implemented in pieces.c (batched positional I/O, one threadpool job per list of pieces):
 *   preadPieces(fd, positions, lengths, into), pwritePieces(fd, positions, lengths, data)
 * Also exported here, implemented in payload.c (the payload codec):
 *   crc32c(buf), crc32cPortable(buf), lz4CompressCrc(src, dst), lz4DecompressInto(src, dst)
 * and in gmac.c (the frame MAC): gmacKey(key), gmacTag(handle, dir, seq, frame[, frame2]), gmacVerify(handle, dir, seq, frame, tag)
 * and in digest.c (chunk digests, threadpool): chunkDigests(buf, chunkSize, out)
 * Errors are Node-style: message "<syscall> failed: <strerror>", code "E...", errno, syscall.
 * Offsets and lengths are JS numbers (exact up to 2^53 bytes).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <node_api.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "digest.h"
#include "gmac.h"
#include "payload.h"
#include "pieces.h"

static const char *errno_name(int e) {
  switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EIO: return "EIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case ENODEV: return "ENODEV";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS";
    case ENOTTY: return "ENOTTY";
    case ENXIO: return "ENXIO";
    case EINTR: return "EINTR";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ENOSYS: return "ENOSYS";
    case EDQUOT: return "EDQUOT";
    case EOVERFLOW: return "EOVERFLOW";
    case EXDEV: return "EXDEV";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ETXTBSY: return "ETXTBSY";
    default: return NULL;
  }
}

static napi_value make_error(napi_env env, const char *syscall, int err) {
  char msg[256];
  char codebuf[32];
  const char *code = errno_name(err);
  if (!code) {
    snprintf(codebuf, sizeof codebuf, "E%d", err);
    code = codebuf;
  }
  snprintf(msg, sizeof msg, "%s failed: %s", syscall, strerror(err));
  napi_value jmsg, jcode, error, jerrno, jsys;
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &jmsg);
  napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &jcode);
  napi_create_error(env, jcode, jmsg, &error);
  napi_create_int32(env, err, &jerrno);
  napi_set_named_property(env, error, "errno", jerrno);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &jsys);
  napi_set_named_property(env, error, "syscall", jsys);
  return error;
}

/* make_error for the other files of the addon (pieces.h). */
napi_value tm_make_error(napi_env env, const char *syscall, int err) { return make_error(env, syscall, err); }

static void throw_errno(napi_env env, const char *syscall, int err) {
  napi_throw(env, make_error(env, syscall, err));
}

/* Read args as int64; throws TypeError and returns 0 on a bad argument. */
static int get_args(napi_env env, napi_callback_info info, size_t want, int64_t *out) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < want) {
    napi_throw_type_error(env, NULL, "missing arguments");
    return 0;
  }
  for (size_t i = 0; i < want; i++) {
    napi_valuetype t;
    napi_typeof(env, argv[i], &t);
    if (t != napi_number) {
      napi_throw_type_error(env, NULL, "arguments must be numbers");
      return 0;
    }
    double d;
    napi_get_value_double(env, argv[i], &d);
    if (d < 0 || d != (double)(int64_t)d || d > 9007199254740992.0) {
      napi_throw_type_error(env, NULL, "arguments must be non-negative integers");
      return 0;
    }
    out[i] = (int64_t)d;
  }
  return 1;
}

static napi_value number(napi_env env, double v) {
  napi_value r;
  napi_create_double(env, v, &r);
  return r;
}

static napi_value do_seek(napi_env env, napi_callback_info info, int whence, const char *name) {
  int64_t a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  off_t r = lseek((int)a[0], (off_t)a[1], whence);
  if (r < 0) {
    if (errno == ENXIO) return number(env, -1);
    throw_errno(env, name, errno);
    return NULL;
  }
  return number(env, (double)r);
}

static napi_value SeekData(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_DATA, "lseek(SEEK_DATA)"); }
static napi_value SeekHole(napi_env env, napi_callback_info info) { return do_seek(env, info, SEEK_HOLE, "lseek(SEEK_HOLE)"); }

static napi_value BlkGetSize64(napi_env env, napi_callback_info info) {
  int64_t a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  uint64_t size = 0;
  if (ioctl((int)a[0], BLKGETSIZE64, &size) < 0) {
    throw_errno(env, "ioctl(BLKGETSIZE64)", errno);
    return NULL;
  }
  return number(env, (double)size);
}

/* ---- asynchronous range operations on the libuv threadpool ---- */

enum op { OP_PUNCH, OP_ZERO, OP_DISCARD, OP_CLONE, OP_FIEMAP, OP_SEEKMAP };

struct work {
  napi_async_work work;
  napi_deferred deferred;
  enum op op;
  int fd;
  int64_t offset, length;
  int err;
  int sync;                 /* OP_FIEMAP: FIEMAP_FLAG_SYNC */
  double *extents;          /* OP_FIEMAP: logical, physical, length, flags per extent; OP_SEEKMAP: start, end per range */
  size_t count, cap;
  int64_t max;              /* OP_SEEKMAP: at most this many ranges */
};

/* Room for one more extent of `per` numbers in w->extents; ENOMEM when none. */
static int grow(struct work *w, size_t per) {
  if (w->count < w->cap) return 0;
  size_t cap = w->cap ? w->cap * 2 : 64;
  double *n = realloc(w->extents, cap * per * sizeof(double));
  if (!n) return ENOMEM;
  w->extents = n;
  w->cap = cap;
  return 0;
}

/*
 * SEEK_DATA / SEEK_HOLE over [offset, length) (length is the end here): the
 * allocated ranges as start, end pairs (end may pass the given end: the
 * caller clips), at most w->max of them. On the threadpool: a filesystem may
 * hold a seek behind a writer's lock for seconds (seen on XFS while the same
 * file is written and flushed), which must not stop the event loop.
 */
static int do_seekmap(struct work *w) {
  off_t pos = (off_t)w->offset, end = (off_t)w->length;
  while (pos < end && (int64_t)w->count < w->max) {
    off_t data = lseek(w->fd, pos, SEEK_DATA);
    if (data < 0) return errno == ENXIO ? 0 : errno;
    if (data >= end) return 0;
    off_t hole = lseek(w->fd, data, SEEK_HOLE);
    if (hole < 0) {
      if (errno != ENXIO) return errno;
      hole = end;
    }
    if (grow(w, 2)) return ENOMEM;
    w->extents[w->count * 2] = (double)data;
    w->extents[w->count * 2 + 1] = (double)hole;
    w->count++;
    pos = hole;
  }
  return 0;
}

/* FIEMAP over [offset, offset+length): every mapped extent, batch after batch. */
static int do_fiemap(struct work *w) {
  enum { BATCH = 512 };
  size_t sz = sizeof(struct fiemap) + BATCH * sizeof(struct fiemap_extent);
  struct fiemap *fm = malloc(sz);
  if (!fm) return ENOMEM;
  uint64_t pos = (uint64_t)w->offset, end = (uint64_t)w->offset + (uint64_t)w->length;
  int err = 0, flags = w->sync ? FIEMAP_FLAG_SYNC : 0;
  while (pos < end) {
    memset(fm, 0, sz);
    fm->fm_start = pos;
    fm->fm_length = end - pos;
    fm->fm_flags = flags;
    fm->fm_extent_count = BATCH;
    if (ioctl(w->fd, FS_IOC_FIEMAP, fm) < 0) {
      err = errno;
      break;
    }
    flags = 0; /* synced once is enough */
    if (fm->fm_mapped_extents == 0) break;
    int last = 0;
    for (uint32_t i = 0; i < fm->fm_mapped_extents; i++) {
      struct fiemap_extent *e = &fm->fm_extents[i];
      if (grow(w, 4)) {
        free(fm);
        return ENOMEM;
      }
      double *d = w->extents + w->count * 4;
      d[0] = (double)e->fe_logical;
      d[1] = (double)e->fe_physical;
      d[2] = (double)e->fe_length;
      d[3] = (double)e->fe_flags;
      w->count++;
      if (e->fe_flags & FIEMAP_EXTENT_LAST) last = 1;
      pos = e->fe_logical + e->fe_length;
    }
    if (last) break;
  }
  free(fm);
  return err;
}

static const char *op_name(enum op op) {
  switch (op) {
    case OP_PUNCH: return "fallocate(PUNCH_HOLE)";
    case OP_ZERO: return "fallocate(ZERO_RANGE)";
    case OP_CLONE: return "ioctl(FICLONE)";
    case OP_FIEMAP: return "ioctl(FS_IOC_FIEMAP)";
    case OP_SEEKMAP: return "lseek(SEEK_DATA/SEEK_HOLE)";
    default: return "ioctl(BLKDISCARD)";
  }
}

static void execute(napi_env env, void *data) {
  struct work *w = data;
  int r;
  switch (w->op) {
    case OP_PUNCH:
      do r = fallocate(w->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, w->offset, w->length);
      while (r < 0 && errno == EINTR);
      break;
    case OP_ZERO:
      do r = fallocate(w->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, w->offset, w->length);
      while (r < 0 && errno == EINTR);
      break;
    case OP_CLONE:
      r = ioctl(w->fd, FICLONE, (int)w->offset);
      break;
    case OP_FIEMAP:
      w->err = do_fiemap(w);
      return;
    case OP_SEEKMAP:
      w->err = do_seekmap(w);
      return;
    default: {
      uint64_t range[2] = {(uint64_t)w->offset, (uint64_t)w->length};
      r = ioctl(w->fd, BLKDISCARD, range);
    }
  }
  w->err = r < 0 ? errno : 0;
}

static void complete(napi_env env, napi_status status, void *data) {
  struct work *w = data;
  if (w->err == 0 && status == napi_ok) {
    napi_value result;
    if (w->op == OP_FIEMAP || w->op == OP_SEEKMAP) {
      size_t per = w->op == OP_FIEMAP ? 4 : 2;
      napi_value ab;
      void *mem;
      napi_create_arraybuffer(env, w->count * per * sizeof(double), &mem, &ab);
      if (w->count) memcpy(mem, w->extents, w->count * per * sizeof(double));
      napi_create_typedarray(env, napi_float64_array, w->count * per, ab, 0, &result);
    } else {
      napi_get_undefined(env, &result);
    }
    napi_resolve_deferred(env, w->deferred, result);
  } else {
    napi_reject_deferred(env, w->deferred, make_error(env, op_name(w->op), w->err ? w->err : EIO));
  }
  napi_delete_async_work(env, w->work);
  free(w->extents);
  free(w);
}

static napi_value start_op(napi_env env, napi_callback_info info, enum op op) {
  int64_t a[4] = {0, 0, 0, 0};
  size_t want = op == OP_CLONE ? 2 : op == OP_FIEMAP || op == OP_SEEKMAP ? 4 : 3;
  if (!get_args(env, info, want, a)) return NULL;
  struct work *w = calloc(1, sizeof *w);
  if (!w) {
    throw_errno(env, op_name(op), ENOMEM);
    return NULL;
  }
  w->op = op;
  w->fd = (int)a[0];
  w->offset = a[1];
  w->length = a[2];
  w->sync = a[3] != 0;
  w->max = a[3];
  if (op == OP_SEEKMAP && w->max < 1) {
    free(w);
    napi_throw_type_error(env, NULL, "seekMap: maxRanges must be at least 1");
    return NULL;
  }
  napi_value promise, name;
  napi_create_promise(env, &w->deferred, &promise);
  napi_create_string_utf8(env, op_name(op), NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, execute, complete, w, &w->work);
  napi_queue_async_work(env, w->work);
  return promise;
}

static napi_value PunchHole(napi_env env, napi_callback_info info) { return start_op(env, info, OP_PUNCH); }
static napi_value SeekMap(napi_env env, napi_callback_info info) { return start_op(env, info, OP_SEEKMAP); }
static napi_value ZeroRange(napi_env env, napi_callback_info info) { return start_op(env, info, OP_ZERO); }
static napi_value BlkDiscard(napi_env env, napi_callback_info info) { return start_op(env, info, OP_DISCARD); }
static napi_value Ficlone(napi_env env, napi_callback_info info) { return start_op(env, info, OP_CLONE); }
static napi_value Fiemap(napi_env env, napi_callback_info info) { return start_op(env, info, OP_FIEMAP); }

/*
 * sd_notify(3) without libsystemd: one datagram to the unix socket systemd
 * names in NOTIFY_SOCKET ("@" = abstract namespace). Node has no unix datagram
 * sockets. Returns false when no socket path is given.
 */
static napi_value SdNotify(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  char path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
  char msg[4096];
  size_t plen = 0, mlen = 0;
  if (argc < 2 || napi_get_value_string_utf8(env, argv[0], path, sizeof path, &plen) != napi_ok ||
      napi_get_value_string_utf8(env, argv[1], msg, sizeof msg, &mlen) != napi_ok) {
    napi_throw_type_error(env, NULL, "sdNotify(socketPath: string, message: string)");
    return NULL;
  }
  napi_value r;
  if (plen == 0) {
    napi_get_boolean(env, false, &r);
    return r;
  }
  if (plen >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
    throw_errno(env, "sd_notify", ENAMETOOLONG);
    return NULL;
  }
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  memcpy(sa.sun_path, path, plen);
  if (path[0] == '@') sa.sun_path[0] = 0;
  socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    throw_errno(env, "socket", errno);
    return NULL;
  }
  ssize_t n = sendto(fd, msg, mlen, MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
  int e = errno;
  close(fd);
  if (n < 0) {
    throw_errno(env, "sendto(NOTIFY_SOCKET)", e);
    return NULL;
  }
  napi_get_boolean(env, true, &r);
  return r;
}

static napi_value Init(napi_env env, napi_value exports) {
  tm_payload_init();
  napi_property_descriptor props[] = {
      {"seekData", NULL, SeekData, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekHole", NULL, SeekHole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekMap", NULL, SeekMap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchHole", NULL, PunchHole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zeroRange", NULL, ZeroRange, NULL, NULL, NULL, napi_enumerable, NULL},
      {"blkGetSize64", NULL, BlkGetSize64, NULL, NULL, NULL, napi_enumerable, NULL},
      {"blkDiscard", NULL, BlkDiscard, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ficlone", NULL, Ficlone, NULL, NULL, NULL, napi_enumerable, NULL},
      {"fiemap", NULL, Fiemap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"preadPieces", NULL, PreadPieces, NULL, NULL, NULL, napi_enumerable, NULL},
      {"pwritePieces", NULL, PwritePieces, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sdNotify", NULL, SdNotify, NULL, NULL, NULL, napi_enumerable, NULL},
      {"lz4DecompressInto", NULL, Lz4DecompressInto, NULL, NULL, NULL, napi_enumerable, NULL},
      {"lz4CompressCrc", NULL, Lz4CompressCrc, NULL, NULL, NULL, napi_enumerable, NULL},
      {"crc32c", NULL, Crc32c, NULL, NULL, NULL, napi_enumerable, NULL},
      {"crc32cPortable", NULL, Crc32cPortable, NULL, NULL, NULL, napi_enumerable, NULL},
      {"gmacKey", NULL, GmacKey, NULL, NULL, NULL, napi_enumerable, NULL},
      {"gmacTag", NULL, GmacTag, NULL, NULL, NULL, napi_enumerable, NULL},
      {"gmacVerify", NULL, GmacVerify, NULL, NULL, NULL, napi_enumerable, NULL},
      {"chunkDigests", NULL, ChunkDigests, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
