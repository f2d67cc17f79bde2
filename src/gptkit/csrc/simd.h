// Plain vector registers for gptkit's CPU kernels, one set of helpers per ISA build
// (kernels.py compiles every source once per ISA): AVX-512 (F, BW; VNNI where the build
// has it) or AVX2 with FMA. Vec holds kWidth floats; IVec the int8 path's int16 pairs.

#pragma once

// The op namespace: kernels.py passes one per ISA build (-DGPTKIT_NS=gptkit_cpu_<isa>).
#ifndef GPTKIT_NS
#define GPTKIT_NS gptkit_cpu
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace gptkit_simd {

#if defined(__AVX512F__) && defined(__AVX512BW__)
using Vec = __m512;
constexpr int64_t kWidth = 16;  // floats per vector
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {  // 16 bf16 -> fp32: the bits, shifted up by 16
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Vec vload(const int8_t* p) {  // 16 int8 -> fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec vset(float f) { return _mm512_set1_ps(f); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vabs(Vec v) { return _mm512_abs_ps(v); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline float vmaxall(Vec v) { return _mm512_reduce_max_ps(v); }
// kWidth floats rounded to the nearest int16 (saturating), into q.
inline void vstore_int16(Vec v, int16_t* q) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(v)));
}
// The int8 path's integer vectors: kPairs int16 products summed in pairs into int32 lanes.
using IVec = __m512i;
constexpr int64_t kPairs = 32;
inline IVec izero() { return _mm512_setzero_si512(); }
inline IVec iload(const int16_t* p) { return _mm512_loadu_si512(p); }
inline IVec iload(const int8_t* p) {  // 32 int8 -> 32 int16
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline IVec imadd(IVec x, IVec w, IVec acc) {  // acc + the sums of adjacent products
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, x, w);  // one instruction for madd + add
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w));
#endif
}
inline int64_t isum(IVec v) {  // exact: the lanes widened to int64 first
  return _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v))) +
         _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
}
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int64_t kWidth = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Vec vload(const int8_t* p) {  // 8 int8 -> fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
inline Vec vset(float f) { return _mm256_set1_ps(f); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vabs(Vec v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline float vmaxall(Vec v) {
  float lanes[kWidth];
  _mm256_storeu_ps(lanes, v);
  return *std::max_element(lanes, lanes + kWidth);
}
inline void vstore_int16(Vec v, int16_t* q) {
  const __m256i i = _mm256_cvtps_epi32(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                   _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
}
using IVec = __m256i;
constexpr int64_t kPairs = 16;
inline IVec izero() { return _mm256_setzero_si256(); }
inline IVec iload(const int16_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline IVec iload(const int8_t* p) {  // 16 int8 -> 16 int16
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline IVec imadd(IVec x, IVec w, IVec acc) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w));
}
inline int64_t isum(IVec v) {
  int32_t lanes[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t s = 0;
  for (int32_t lane : lanes) s += lane;
  return s;
}
#else
#error "gptkit's CPU kernels need AVX-512 (F, BW) or AVX2 with FMA"
#endif

}  // namespace gptkit_simd
