/* Payload codec functions of the addon (payload.c), registered by thinmirror.c. */
#ifndef THINMIRROR_PAYLOAD_H
#define THINMIRROR_PAYLOAD_H
#include <node_api.h>
#include <stddef.h>
#include <stdint.h>

void tm_payload_init(void);
uint32_t tm_crc32c(const uint8_t *p, size_t n);
/* `v` as a Uint8Array (a Buffer too): 1 and its bytes, else 0. */
int tm_u8_array(napi_env env, napi_value v, uint8_t **data, size_t *len);
/*
 * A threadpool job on two buffers that settles a promise: the first member of
 * a job's own struct. tm_job_start keeps both buffers alive, creates the
 * promise and queues the job (the struct must come from malloc);
 * tm_job_finish settles the promise with `value`, or rejects it with
 * `error` when that is not NULL, then frees the job.
 */
struct tm_job {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref refs[2];
};
napi_value tm_job_start(napi_env env, struct tm_job *job, napi_value buf0, napi_value buf1, const char *name, napi_async_execute_callback execute, napi_async_complete_callback complete);
void tm_job_finish(napi_env env, struct tm_job *job, napi_value value, const char *error);
napi_value Crc32c(napi_env env, napi_callback_info info);
napi_value Crc32cPortable(napi_env env, napi_callback_info info);
napi_value Lz4CompressCrc(napi_env env, napi_callback_info info);
napi_value Lz4DecompressInto(napi_env env, napi_callback_info info);
#endif
