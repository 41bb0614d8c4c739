// route_steer, C++ CPU kernel: fused SAE encode -> argmax routing -> steering add.
// Semantics: hybridfast/ops/reference.py::route_steer_ref. All tensors contiguous (the Python
// wrapper ensures it); router tensors share dtype rdt, h/V/bias/out share dtype hdt.
#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace hybridfast {

int64_t route_steer_cpu(const RouteSteerArgs& a) {
  const int64_t B = a.B, d = a.d, dr = a.d_r, K = a.K, C = a.C;
  // Encoder weights as float: used in place when already float32, else converted once per call.
  std::vector<float> Wbuf(a.rdt == F32 ? 0 : dr * K), benc(K), bdec(dr), xmean(a.x_mean ? dr : 0);
  std::vector<float> biasf(a.bias ? d : 0);
  if (a.rdt != F32) load_row(a.W_enc, a.rdt, 0, dr * K, Wbuf.data());
  const float* W = a.rdt == F32 ? static_cast<const float*>(a.W_enc) : Wbuf.data();
  if (a.bias) load_row(a.bias, a.hdt, 0, d, biasf.data());
  load_row(a.b_enc, a.rdt, 0, K, benc.data());
  load_row(a.b_dec, a.rdt, 0, dr, bdec.data());
  if (a.x_mean) load_row(a.x_mean, a.rdt, 0, dr, xmean.data());
  int64_t bad = -1;

#pragma omp parallel for schedule(static) if (B * (dr * K + d * (C > 0 ? C : 1)) > (1 << 16))
  for (int64_t b = 0; b < B; ++b) {
    std::vector<float> u(dr), z(K), hv(d), vrow(d), orow(d);
    load_row(a.x, a.rdt, b * dr, dr, u.data());
    load_row(a.h, a.hdt, b * d, d, hv.data());
    bool has_nan = false;
    for (int64_t i = 0; i < dr; ++i) has_nan |= std::isnan(u[i]);
    for (int64_t i = 0; i < d; ++i) has_nan |= std::isnan(hv[i]);
    if (has_nan) {
#pragma omp critical
      { if (bad < 0 || b < bad) bad = b; }
      continue;
    }
    if (a.x_mean)
      for (int64_t i = 0; i < dr; ++i) u[i] -= xmean[i];
    if (a.normalize) {
      float ss = 0.f;
      for (int64_t i = 0; i < dr; ++i) ss += u[i] * u[i];
      float inv = 1.f / std::max(std::sqrt(ss), 1e-12f);
      for (int64_t i = 0; i < dr; ++i) u[i] *= inv;
    }
    for (int64_t k = 0; k < K; ++k) z[k] = benc[k];
    for (int64_t i = 0; i < dr; ++i) {
      const float ui = u[i] - bdec[i];
      const float* w = W + i * K;
      for (int64_t k = 0; k < K; ++k) z[k] += ui * w[k];
    }
    int64_t c = 0;
    for (int64_t k = 1; k < K; ++k)
      if (z[k] > z[c]) c = k;  // strict: ties keep the lowest index
    const bool steer = z[c] > a.threshold;
    a.category[b] = steer ? c : -1;
    load_row(a.V, a.hdt, c * d, d, vrow.data());
    if (a.bias)
      for (int64_t i = 0; i < d; ++i) vrow[i] += biasf[i];
    const int64_t n_out = C == 0 ? 1 : C;
    for (int64_t j = 0; j < n_out; ++j) {
      const float s = steer ? (C == 0 ? a.coef[c] : a.coefs[j]) : 0.f;
      for (int64_t i = 0; i < d; ++i) orow[i] = hv[i] + s * vrow[i];
      store_row(a.out, a.hdt, (b * n_out + j) * d, d, orow.data());
    }
  }
  return bad;
}

}  // namespace hybridfast
