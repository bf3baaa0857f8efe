// The residual add and the RMSNorm after it, as one XLA FFI handler (float32):
//   s[T, E] = x + y;  h[T, E] = s * w / sqrt(mean(s * s over E) + eps)
// engine.model.llama.add_rms_norm is the reference. XLA compiles this pair into four or
// five small kernels (the add, a windowed partial sum of squares, the rsqrt, the scale), each
// a thunk of its own; at one decode row the thunks' dispatch, not the arithmetic, is the
// cost, twice per layer.
#include <cmath>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // independent partial sums: the compiler vectorizes them

ffi::Error AddRmsNorm(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                      ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> h,
                      ffi::ResultBuffer<ffi::F32> s, float eps) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("engine_cpu_add_rms_norm: x not [T, E]");
  const int64_t t = xd[0], e = xd[1];
  for (auto d : {y.dimensions(), h->dimensions(), s->dimensions()}) {
    if (d.size() != 2 || d[0] != t || d[1] != e) {
      return ffi::Error::InvalidArgument("engine_cpu_add_rms_norm: y, h, s must be x's [T, E]");
    }
  }
  if (w.element_count() != e) {
    return ffi::Error::InvalidArgument("engine_cpu_add_rms_norm: w must be [E]");
  }
  const float *xp = x.typed_data(), *yp = y.typed_data(), *wp = w.typed_data();
  float *hp = h->typed_data(), *sp = s->typed_data();
  for (int64_t r = 0; r < t; ++r) {
    const float *xr = xp + r * e, *yr = yp + r * e;
    float *hr = hp + r * e, *sr = sp + r * e;
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= e; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float v = xr[i + l] + yr[i + l];
        sr[i + l] = v;
        acc[l] += v * v;
      }
    }
    for (; i < e; ++i) {
      const float v = xr[i] + yr[i];
      sr[i] = v;
      acc[0] += v * v;
    }
    float sum = 0.0f;
    for (int l = 0; l < kLanes; ++l) sum += acc[l];
    const float inv = 1.0f / std::sqrt(sum / float(e) + eps);
    for (int64_t j = 0; j < e; ++j) hr[j] = sr[j] * inv * wp[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EngineCpuAddRmsNorm, AddRmsNorm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y [T, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [E]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h [T, E], the normed sum
                                  .Ret<ffi::Buffer<ffi::F32>>()  // s [T, E], x + y
                                  .Attr<float>("eps"));
