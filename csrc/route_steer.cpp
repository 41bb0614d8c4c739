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
  // Encoder weights converted once to float (K x d_r, row per latent for contiguous dots).
  std::vector<float> W(dr * K), benc(K), bdec(dr), xmean(a.x_mean ? dr : 0);
  load_row(a.W_enc, a.rdt, 0, dr * K, W.data());
  load_row(a.b_enc, a.rdt, 0, K, benc.data());
  load_row(a.b_dec, a.rdt, 0, dr, bdec.data());
  if (a.x_mean) load_row(a.x_mean, a.rdt, 0, dr, xmean.data());
  int64_t bad = -1;

#pragma omp parallel for schedule(static) if (B * (dr * K + d * (C > 0 ? C : 1)) > (1 << 16))
  for (int64_t b = 0; b < B; ++b) {
    std::vector<float> u(dr), z(K), hv(d), vrow(d);
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
      const float* w = W.data() + i * K;
      for (int64_t k = 0; k < K; ++k) z[k] += ui * w[k];
    }
    int64_t c = 0;
    for (int64_t k = 1; k < K; ++k)
      if (z[k] > z[c]) c = k;  // strict: ties keep the lowest index
    const bool steer = z[c] > a.threshold;
    a.category[b] = steer ? c : -1;
    load_row(a.V, a.hdt, c * d, d, vrow.data());
    if (a.bias)
      for (int64_t i = 0; i < d; ++i) vrow[i] += load(a.bias, a.hdt, i);
    if (C == 0) {
      const float s = steer ? a.coef[c] : 0.f;
      for (int64_t i = 0; i < d; ++i) store(a.out, a.hdt, b * d + i, hv[i] + s * vrow[i]);
    } else {
      for (int64_t j = 0; j < C; ++j) {
        const float s = steer ? a.coefs[j] : 0.f;
        const int64_t base = (b * C + j) * d;
        for (int64_t i = 0; i < d; ++i) store(a.out, a.hdt, base + i, hv[i] + s * vrow[i]);
      }
    }
  }
  return bad;
}

}  // namespace hybridfast
