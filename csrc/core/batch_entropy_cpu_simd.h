// Part of the CPU kernel bodies, compiled once per instruction set inside the namespace that
// LBE_CPU_ISA names; included through batch_entropy_cpu_impl.h only. This part: the element
// types, the vector types, loads and stores of each element type, and the unit loops.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CPU_SIMD_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CPU_SIMD_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lbe {
namespace cpu {
namespace LBE_CPU_ISA {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

// 256-bit vectors; the unaligned variants are for loads and stores at any element boundary.
typedef float F8 __attribute__((vector_size(32)));
typedef float F8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef double D4 __attribute__((vector_size(32)));
typedef double D4u __attribute__((vector_size(32), aligned(8), may_alias));
typedef float F4 __attribute__((vector_size(16)));
typedef int32_t I8 __attribute__((vector_size(32)));
typedef int64_t I4 __attribute__((vector_size(32)));
typedef uint64_t U4 __attribute__((vector_size(32)));
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef uint16_t H8 __attribute__((vector_size(16)));
typedef uint16_t H8u __attribute__((vector_size(16), aligned(2), may_alias));

template <typename Acc> struct Simd;
template <> struct Simd<float> {
  using V = F8;
  static constexpr int64_t kLanes = 8;
  static inline V Load(const float* p) { return *reinterpret_cast<const F8u*>(p); }
  static inline void Store(float* p, V v) { *reinterpret_cast<F8u*>(p) = v; }
};
template <> struct Simd<double> {
  using V = D4;
  static constexpr int64_t kLanes = 4;
  static inline V Load(const double* p) { return *reinterpret_cast<const D4u*>(p); }
  static inline void Store(double* p, V v) { *reinterpret_cast<D4u*>(p) = v; }
};

// The bits of one value as another type of the same size (std::bit_cast before C++20).
template <typename To, typename From>
inline To Bits(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "Bits needs types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// Element access: one element (Load/Store) or one vector of Simd<Acc>::kLanes (LoadV/StoreV),
// converting to and from the accumulation type.
template <typename T> struct Elem;
template <> struct Elem<float> {
  using Acc = float;
  static inline float Load(const float* p) { return *p; }
  static inline void Store(float* p, float v) { *p = v; }
  static inline F8 LoadV(const float* p) { return Simd<float>::Load(p); }
  static inline void StoreV(float* p, F8 v) { Simd<float>::Store(p, v); }
};
template <> struct Elem<double> {
  using Acc = double;
  static inline double Load(const double* p) { return *p; }
  static inline void Store(double* p, double v) { *p = v; }
  static inline D4 LoadV(const double* p) { return Simd<double>::Load(p); }
  static inline void StoreV(double* p, D4 v) { Simd<double>::Store(p, v); }
};
template <> struct Elem<Half> {
  using Acc = float;
  static inline float Load(const Half* p) {
    _Float16 h;
    std::memcpy(&h, p, sizeof(h));
    return static_cast<float>(h);
  }
  static inline void Store(Half* p, float v) {
    const _Float16 h = static_cast<_Float16>(v);
    std::memcpy(p, &h, sizeof(h));
  }
  static inline F8 LoadV(const Half* p) {
#if defined(__F16C__)
    return Bits<F8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    // Exact without F16C and immune to denormals-are-zero: subnormal halves go through an
    // integer-to-float conversion instead of a subnormal float.
    const U8 w = __builtin_convertvector(*reinterpret_cast<const H8u*>(p), U8);
    const U8 magnitude = w & 0x7fffu;
    const U8 sign = (w & 0x8000u) << 16;
    const U8 normal = (magnitude << 13) + ((127u - 15u) << 23);
    const U8 special = (magnitude << 13) | 0x7f800000u;  // inf and NaN
    const F8 subnormal = __builtin_convertvector(Bits<I8>(magnitude), F8) *
                         0x1p-24f;
    U8 bits = magnitude < 0x400u ? Bits<U8>(subnormal) : normal;
    bits = magnitude >= 0x7c00u ? special : bits;
    bits |= sign;
    return Bits<F8>(bits);
#endif
  }
  static inline void StoreV(Half* p, F8 v) {
#if defined(__F16C__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(Bits<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
#else
    for (int k = 0; k < 8; ++k) Store(p + k, v[k]);
#endif
  }
};
template <> struct Elem<BFloat16> {
  using Acc = float;
  static inline float Load(const BFloat16* p) {
    const uint32_t bits = static_cast<uint32_t>(p->bits) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static inline void Store(BFloat16* p, float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
      p->bits = static_cast<uint16_t>((bits >> 16) | 0x40u);
      return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
    p->bits = static_cast<uint16_t>(bits >> 16);
  }
  static inline F8 LoadV(const BFloat16* p) {
#if defined(__AVX2__)
    // GCC builds the generic form below from two 128-bit zero-extensions.
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return Bits<F8>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
    const U8 bits = __builtin_convertvector(*reinterpret_cast<const H8u*>(p), U8) << 16;
    return Bits<F8>(bits);
#endif
  }
  static inline void StoreV(BFloat16* p, F8 v) {
    const U8 bits = Bits<U8>(v);
    const U8 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const U8 quiet_nan = (bits >> 16) | 0x40u;
    const U8 out = (bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
#if defined(__AVX2__)
    // Every lane is below 2^16, so the saturating pack is exact; it packs within 128-bit halves.
    const __m256i packed = _mm256_packus_epi32(Bits<__m256i>(out), Bits<__m256i>(out));
    const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);  // halves 0 and 2 to the front
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(ordered));
#else
    *reinterpret_cast<H8u*>(p) = __builtin_convertvector(out, H8);
#endif
  }
};

// The same arithmetic on one vector (kVec) or on one element; the unit loops below run the vector
// form over whole vectors and the scalar form over the remaining units.
template <typename T, bool kVec>
struct Lane {
  using Acc = typename Elem<T>::Acc;
  using V = std::conditional_t<kVec, typename Simd<Acc>::V, Acc>;
  static constexpr int64_t kWidth = kVec ? Simd<Acc>::kLanes : 1;
  static inline V Load(const T* p) {
    if constexpr (kVec) return Elem<T>::LoadV(p); else return Elem<T>::Load(p);
  }
  static inline void Store(T* p, V v) {
    if constexpr (kVec) Elem<T>::StoreV(p, v); else Elem<T>::Store(p, v);
  }
  static inline V LoadAcc(const Acc* p) {
    if constexpr (kVec) return Simd<Acc>::Load(p); else return *p;
  }
  static inline void StoreAcc(Acc* p, V v) {
    if constexpr (kVec) Simd<Acc>::Store(p, v); else *p = v;
  }
  static inline V Splat(Acc a) { return V{} + a; }
};

// Units [0, width) as whole vectors, then one at a time: body(std::bool_constant<kVec>, j).
template <typename T, typename Body>
inline void ForUnits(int64_t width, Body&& body) {
  constexpr int64_t kLanes = Simd<typename Elem<T>::Acc>::kLanes;
  const int64_t vec_end = width / kLanes * kLanes;
  int64_t j = 0;
  for (; j < vec_end; j += kLanes) body(std::true_type{}, j);
  for (; j < width; ++j) body(std::false_type{}, j);
}

}  // namespace LBE_CPU_ISA
}  // namespace cpu
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CPU_SIMD_H_
