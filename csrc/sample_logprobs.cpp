// sample_logprobs, C++ CPU kernel: one streaming pass over the vocabulary per row with online
// log-sum-exp at temperature 1 and at the sampling temperature, and Gumbel-max sampling with the
// counter-based stream of common.h. Semantics: hybridfast/ops/reference.py::sample_logprobs_ref.
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "ops.h"

namespace hybridfast {

namespace {

// Streaming state over a range of the vocabulary; ranges merge associatively.
struct Partial {
  float m1 = -std::numeric_limits<float>::infinity();
  double s1 = 0.0;  // sum at temperature 1 (double: 152k float adds would lose ~1e-5)
  float mt = -std::numeric_limits<float>::infinity();
  double st = 0.0;  // same for kept logits at the sampling temperature
  float best = -std::numeric_limits<float>::infinity();
  float best_logit = -std::numeric_limits<float>::infinity();
  int64_t best_i = -1;
  bool nan = false;
};

void scan(const SampleArgs& a, int64_t b, int64_t lo, int64_t hi, uint32_t k1, uint32_t k2,
          float thr, Partial& p) {
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  const bool greedy = a.inv_temperature == 0.0f;
  const float inv_t = a.inv_temperature;  // float32(1/tau), computed once in Python
  const int64_t off = b * a.row_stride;
  for (int64_t i = lo; i < hi; ++i) {
    const float l = load(a.logits, a.dt, off + i);
    if (std::isnan(l)) { p.nan = true; return; }
    if (l > p.m1) { p.s1 = p.s1 * std::exp(double(p.m1) - l) + 1.0; p.m1 = l; }
    else if (l != NEG_INF) { p.s1 += std::exp(l - p.m1); }  // float exp, double accumulation
    if (greedy) {
      if (l > p.best || p.best_i < 0) { p.best = l; p.best_logit = l; p.best_i = i; }
      continue;
    }
    if (!(l >= thr) || l == NEG_INF) continue;
    const float sl = l * inv_t;
    if (sl > p.mt) { p.st = p.st * std::exp(double(p.mt) - sl) + 1.0; p.mt = sl; }
    else { p.st += std::exp(sl - p.mt); }
    // Exact pruning: the noise is bounded by GUMBEL_MAX, so a token whose scaled logit is
    // below best - GUMBEL_MAX can never win; skip drawing its noise.
    if (sl + GUMBEL_MAX < p.best) continue;
    const float score = sl + gumbel(k1, k2, static_cast<uint32_t>(i));
    if (score > p.best || p.best_i < 0) { p.best = score; p.best_logit = l; p.best_i = i; }
  }
}

// Merge q (a later range) into p; strict comparison keeps the lowest index on ties.
void merge(Partial& p, const Partial& q) {
  p.nan = p.nan || q.nan;
  auto lse_merge = [](float& m, double& s, float qm, double qs) {
    if (qm == -std::numeric_limits<float>::infinity()) return;
    if (qm > m) { s = s * std::exp(double(m) - qm) + qs; m = qm; }
    else { s += qs * std::exp(double(qm) - m); }
  };
  lse_merge(p.m1, p.s1, q.m1, q.s1);
  lse_merge(p.mt, p.st, q.mt, q.st);
  if (q.best_i >= 0 && (p.best_i < 0 || q.best > p.best)) {
    p.best = q.best; p.best_logit = q.best_logit; p.best_i = q.best_i;
  }
}

}  // namespace

int64_t sample_logprobs_cpu(const SampleArgs& a) {
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  const uint32_t seed = static_cast<uint32_t>(a.seed);
  const bool greedy = a.inv_temperature == 0.0f;
  int64_t bad = -1;
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  // Few long rows: split each row's vocabulary across threads; many rows: one row per thread.
  const int64_t chunks = (a.B < threads && a.V >= 32768) ? threads : 1;
  std::vector<Partial> parts(a.B * chunks);
#pragma omp parallel for schedule(static) collapse(2) if (a.B * a.V > (1 << 15))
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t c = 0; c < chunks; ++c) {
      const uint32_t k1 = mix32(seed ^ mix32(static_cast<uint32_t>(b)));
      const uint32_t k2 = mix32(k1 + 0x9e3779b9u);
      const float thr = a.topk_thresh ? a.topk_thresh[b] : NEG_INF;
      const int64_t lo = a.V * c / chunks, hi = a.V * (c + 1) / chunks;
      scan(a, b, lo, hi, k1, k2, thr, parts[b * chunks + c]);
    }
  }
  for (int64_t b = 0; b < a.B; ++b) {
    Partial p = parts[b * chunks];
    for (int64_t c = 1; c < chunks; ++c) merge(p, parts[b * chunks + c]);
    if (p.nan) {
      if (bad < 0) bad = b;
      continue;
    }
    const int64_t win = p.best_i < 0 ? 0 : p.best_i;
    const float wl = p.best_i < 0 ? NEG_INF : p.best_logit;
    a.tokens[b] = win;
    // A row with no finite logit (all -inf) has no distribution: logp = logq = -inf, never NaN.
    const bool found = wl != NEG_INF;
    a.logp[b] = found ? static_cast<float>(double(wl) - (double(p.m1) + std::log(p.s1))) : NEG_INF;
    a.logq[b] = greedy ? 0.f : found ? static_cast<float>(double(wl * a.inv_temperature) - (double(p.mt) + std::log(p.st))) : NEG_INF;
  }
  return bad;
}

}  // namespace hybridfast
