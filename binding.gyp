{
  "targets": [
    {
      "target_name": "thinmirror_native",
      "sources": ["src/native/thinmirror.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE", "_FILE_OFFSET_BITS=64"]
    }
  ]
}
