/* Payload codec functions of the addon (payload.c), registered by thinmirror.c. */
#ifndef THINMIRROR_PAYLOAD_H
#define THINMIRROR_PAYLOAD_H
#include <node_api.h>
#include <stddef.h>
#include <stdint.h>

void tm_payload_init(void);
uint32_t tm_crc32c(const uint8_t *p, size_t n);
napi_value Crc32c(napi_env env, napi_callback_info info);
napi_value Crc32cPortable(napi_env env, napi_callback_info info);
napi_value Lz4CompressCrc(napi_env env, napi_callback_info info);
napi_value Lz4DecompressInto(napi_env env, napi_callback_info info);
#endif
