// sample_logprobs, C++ CPU kernel: one streaming pass over the vocabulary per row with online
// log-sum-exp at temperature 1 and at the sampling temperature, and Gumbel-max sampling with the
// counter-based stream of common.h. Semantics: hybridfast/ops/reference.py::sample_logprobs_ref.
#include <limits>

#include "common.h"
#include "ops.h"

namespace hybridfast {

int64_t sample_logprobs_cpu(const SampleArgs& a) {
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  const uint32_t seed = static_cast<uint32_t>(a.seed);
  const bool greedy = a.inv_temperature == 0.0f;
  const float inv_t = a.inv_temperature;  // float32(1/tau), computed once in Python
  int64_t bad = -1;

#pragma omp parallel for schedule(static) if (a.B * a.V > (1 << 15))
  for (int64_t b = 0; b < a.B; ++b) {
    const uint32_t k1 = mix32(seed ^ mix32(static_cast<uint32_t>(b)));
    const uint32_t k2 = mix32(k1 + 0x9e3779b9u);
    const float thr = a.topk_thresh ? a.topk_thresh[b] : NEG_INF;
    float m1 = NEG_INF; double s1 = 0.0;   // running max / sum at temperature 1 (sum in double:
    // V = 152k sequential float adds would lose ~1e-5)
    float mt = NEG_INF; double st = 0.0;   // same for kept logits at temperature tau
    float best = NEG_INF, best_logit = NEG_INF;
    int64_t best_i = 0;
    bool has_nan = false;
    const int64_t off = b * a.row_stride;
    for (int64_t i = 0; i < a.V; ++i) {
      const float l = load(a.logits, a.dt, off + i);
      if (std::isnan(l)) { has_nan = true; break; }
      if (l > m1) { s1 = s1 * std::exp(double(m1) - l) + 1.0; m1 = l; }
      else if (l != NEG_INF) { s1 += std::exp(l - m1); }  // float exp, double accumulation
      if (greedy) {
        if (l > best || (best_i == 0 && i == 0)) { best = l; best_logit = l; best_i = i; }
        continue;
      }
      if (!(l >= thr) || l == NEG_INF) continue;
      const float sl = l * inv_t;
      if (sl > mt) { st = st * std::exp(double(mt) - sl) + 1.0; mt = sl; }
      else { st += std::exp(sl - mt); }
      // Exact pruning: the noise is bounded by GUMBEL_MAX, so a token whose scaled logit is
      // below best - GUMBEL_MAX can never win; skip drawing its noise.
      if (sl + GUMBEL_MAX < best) continue;
      const float score = sl + gumbel(k1, k2, static_cast<uint32_t>(i));
      if (score > best) { best = score; best_logit = l; best_i = i; }
    }
    if (has_nan) {
#pragma omp critical
      { if (bad < 0 || b < bad) bad = b; }
      continue;
    }
    a.tokens[b] = best_i;
    a.logp[b] = static_cast<float>(double(best_logit) - (double(m1) + std::log(s1)));
    a.logq[b] = greedy ? 0.f : static_cast<float>(double(best_logit * inv_t) - (double(mt) + std::log(st)));
  }
  return bad;
}

}  // namespace hybridfast
