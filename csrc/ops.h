#pragma once
#include <cstdint>

namespace hybridfast {

struct RouteSteerArgs {
  const void* h; const void* x; const void* W_enc; const void* b_enc; const void* b_dec;
  const void* V; const void* bias; const void* x_mean;  // bias / x_mean may be null
  const float* coef; const float* coefs;                  // coefs null unless C > 0
  void* out; int64_t* category;
  int64_t B, d, d_r, K, C;
  int hdt, rdt;
  bool normalize;
  float threshold;
};

struct SampleArgs {
  const void* logits; int dt;
  int64_t B, V, row_stride;
  float inv_temperature;  // 0 means greedy
  int64_t seed;
  const float* topk_thresh;  // null unless top-k
  int64_t* tokens; float* logp; float* logq;
};

// Return -1 on success, else the first row holding a NaN.
int64_t route_steer_cpu(const RouteSteerArgs& a);
int64_t sample_logprobs_cpu(const SampleArgs& a);

}  // namespace hybridfast
