/* Batched positional I/O of the addon (pieces.c), registered by thinmirror.c. */
#ifndef THINMIRROR_PIECES_H
#define THINMIRROR_PIECES_H
#include <node_api.h>

/* preadPieces(fd, positions, lengths, into) / pwritePieces(fd, positions, lengths, data): Promise<void>. */
napi_value PreadPieces(napi_env env, napi_callback_info info);
napi_value PwritePieces(napi_env env, napi_callback_info info);

/* thinmirror.c's Node-style system error: message "<syscall> failed: <strerror>", code "E...", errno, syscall. */
napi_value tm_make_error(napi_env env, const char *syscall, int err);
#endif
