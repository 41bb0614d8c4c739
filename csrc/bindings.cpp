// pybind11 module hybridfast._C: thin entry points taking data pointers of contiguous torch
// tensors (the Python side validates shapes/dtypes/devices and registers torch.library ops).
#include <pybind11/pybind11.h>

#include "ops.h"

namespace py = pybind11;
using namespace hybridfast;

template <typename T> static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "hybridfast C++ CPU kernels";
  m.def("route_steer",
        [](uintptr_t h, uintptr_t x, uintptr_t W_enc, uintptr_t b_enc, uintptr_t b_dec,
           uintptr_t V, uintptr_t bias, uintptr_t x_mean, uintptr_t coef, uintptr_t coefs,
           uintptr_t out, uintptr_t category, int64_t B, int64_t d, int64_t d_r, int64_t K,
           int64_t C, int hdt, int rdt, bool normalize, float threshold) {
          RouteSteerArgs a{ptr<const void>(h), ptr<const void>(x), ptr<const void>(W_enc),
                           ptr<const void>(b_enc), ptr<const void>(b_dec), ptr<const void>(V),
                           ptr<const void>(bias), ptr<const void>(x_mean), ptr<const float>(coef),
                           ptr<const float>(coefs), ptr<void>(out), ptr<int64_t>(category),
                           B, d, d_r, K, C, hdt, rdt, normalize, threshold};
          py::gil_scoped_release nogil;
          return route_steer_cpu(a);
        });
  m.def("sample_logprobs",
        [](uintptr_t logits, int dt, int64_t B, int64_t V, int64_t row_stride, float inv_temperature,
           int64_t seed, uintptr_t topk_thresh, uintptr_t tokens, uintptr_t logp, uintptr_t logq) {
          SampleArgs a{ptr<const void>(logits), dt, B, V, row_stride, inv_temperature, seed,
                       ptr<const float>(topk_thresh), ptr<int64_t>(tokens), ptr<float>(logp),
                       ptr<float>(logq)};
          py::gil_scoped_release nogil;
          return sample_logprobs_cpu(a);
        });
  m.def("openmp_threads", []() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
  });
}
