/* Chunk digests of the addon (digest.c), registered by thinmirror.c. */
#ifndef THINMIRROR_DIGEST_H
#define THINMIRROR_DIGEST_H
#include <node_api.h>

napi_value ChunkDigests(napi_env env, napi_callback_info info);
#endif
