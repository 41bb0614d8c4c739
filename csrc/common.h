// Shared helpers for the hybridfast CPU kernels: dtype codes, fp16/bf16 conversion and the
// counter-based random stream (must stay bit-identical to hybridfast/ops/rng.py).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace hybridfast {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, like torch
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) { man <<= 1; --exp; }
      man &= 0x3ffu;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);    // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);   // overflow -> inf
  if (a < 0x38800000u) {                                                 // subnormal or zero
    if (a < 0x33000000u) return static_cast<uint16_t>(sign);
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 - (e - 127) + 13 - 1
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

inline float load(const void* p, int dt, int64_t i) {
  switch (dt) {
    case F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store(void* p, int dt, int64_t i, float v) {
  switch (dt) {
    case F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    case BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Convert n elements of dtype dt into a float buffer.
inline void load_row(const void* p, int dt, int64_t off, int64_t n, float* dst) {
  if (dt == F32) {
    std::memcpy(dst, static_cast<const float*>(p) + off, n * sizeof(float));
  } else if (dt == BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  }
}

// Convert n floats into dtype dt at p[off..off+n).
inline void store_row(void* p, int dt, int64_t off, int64_t n, const float* src) {
  if (dt == F32) {
    std::memcpy(static_cast<float*>(p) + off, src, n * sizeof(float));
  } else if (dt == BF16) {
    uint16_t* d = static_cast<uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(p) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
  }
}

// ---- counter-based RNG (see hybridfast/ops/rng.py) ----
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Upper bound of the noise: u <= 1 - 2^-24 gives -log(-log(u)) <= 16.7 (17.5 with margin).
constexpr float GUMBEL_MAX = 17.5f;

inline float gumbel(uint32_t k1, uint32_t k2, uint32_t col) {
  uint32_t bits = mix32(mix32(col ^ k1) ^ k2);
  float u = (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
  return -std::log(-std::log(u));
}

}  // namespace hybridfast
