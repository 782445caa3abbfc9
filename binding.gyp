{
  "targets": [
    {
      "target_name": "thinmirror_native",
      "sources": ["src/native/thinmirror.c", "src/native/payload.c", "src/native/gmac.c", "src/native/pieces.c", "src/native/digest.c", "src/native/vendor/lz4/lz4.c"],
      "cflags": ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE", "_FILE_OFFSET_BITS=64"]
    }
  ]
}
