#ifndef TM_GMAC_H
#define TM_GMAC_H
#include <node_api.h>

/* gmacKey(key32) -> handle; gmacTag(handle, dir, seq, frame[, frame2]) -> Buffer(16) (the tag of frame || frame2);
 * gmacVerify(handle, dir, seq, frame, tag) -> boolean (constant time). */
napi_value GmacKey(napi_env env, napi_callback_info info);
napi_value GmacTag(napi_env env, napi_callback_info info);
napi_value GmacVerify(napi_env env, napi_callback_info info);

#endif
