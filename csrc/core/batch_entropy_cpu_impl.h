// The CPU kernel bodies. This header is compiled twice, once per instruction set (see
// batch_entropy_cpu_generic.cc and batch_entropy_cpu_avx2.cc), inside the namespace that
// LBE_CPU_ISA names; batch_entropy_cpu.cc picks one at run time.
//
// Forward, per work item (a block of units over a segment of rows, see batch_entropy_cpu_plan.h):
// every unit is shifted by its value in row 0 (the pivot, LoadPivots), so a mean far larger than
// the spread costs no accuracy; for each chunk of kChunkRows rows, a sum pass and a centering
// pass (the chunk is still in cache for the second) give (n, mean, M2) of the shifted values;
// chunks and then segments are merged pairwise (Chan et al.), so the error grows with
// log(batch), not batch. Units whose statistics come out non-finite go to the wide path
// (batch_entropy_wide.h, FinishBlock). Both passes walk the rows front to back, four rows at a time, with the
// unit loop innermost and vectorized (GCC vector extensions: 256-bit AVX2 in the avx2 build, pairs
// of SSE2 registers in the generic one); units past the last full vector take a scalar loop with
// the same arithmetic. Narrow blocks (at most kNarrowVectors vectors of units, a deep network's
// layers) run the same arithmetic with the rows innermost and the accumulators in registers.
// Backward: dx = (x - mean) * s + t per unit, x read once and dx written once, a run of whole rows
// per item where the rows are narrow enough; narrow blocks hold s, t and the means in registers.
// Items with a variance so large that s would underflow take the wide path (WideBackwardItem).
// Both passes prefetch the next work item while they compute (ItemPrefetcher), except the
// backward pass of narrow blocks: there the prefetches cost as much as the loop itself when the
// group is in the last-level cache, and gained nothing measurable when it was not.
#ifndef LBE_CPU_ISA
#error "define LBE_CPU_ISA before including batch_entropy_cpu_impl.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "batch_entropy_common.h"
#include "batch_entropy_cpu.h"
#include "batch_entropy_cpu_plan.h"
#include "batch_entropy_dtype.h"
#include "batch_entropy_wide.h"

// Everything below is internal to one translation unit (inlined, never passed across the
// ISA boundary), so the ABI of 256-bit vectors in the generic build does not matter. (Not popped:
// GCC reports the warning at the end of the including file.)
#pragma GCC diagnostic ignored "-Wpsabi"

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

// Running statistics of one unit block over some rows, held in caller-provided arrays.
template <typename Acc>
struct Moments {
  int64_t n;
  Acc* mean;
  Acc* m2;
};

// Merges b into a (a holds the earlier rows): Chan, Golub and LeVeque's pairwise update.
template <typename Acc>
inline void Merge(Moments<Acc>& a, const Moments<Acc>& b, int64_t width) {
  const int64_t n = a.n + b.n;
  const Acc weight_b = static_cast<Acc>(b.n) / static_cast<Acc>(n);
  const Acc weight_m2 = static_cast<Acc>(static_cast<double>(a.n) * static_cast<double>(b.n) /
                                         static_cast<double>(n));
  Acc* __restrict__ am = a.mean;
  Acc* __restrict__ a2 = a.m2;
  const Acc* __restrict__ bm = b.mean;
  const Acc* __restrict__ b2 = b.m2;
  for (int64_t j = 0; j < width; ++j) {
    const Acc delta = bm[j] - am[j];
    am[j] += delta * weight_b;
    a2[j] += b2[j] + delta * delta * weight_m2;
  }
  a.n = n;
}

// Scratch memory of the calling thread, reused across calls (no allocation per work item).
template <typename Acc>
inline Acc* Scratch(size_t elements) {
  thread_local std::vector<Acc> buffer;
  if (buffer.size() < elements) buffer.resize(elements);
  return buffer.data();
}

// A stack of partial moments merged like a binary counter: pairwise summation of moments.
template <typename Acc>
class PairwiseMerger {
 public:
  PairwiseMerger(int64_t width, int64_t max_parts, Acc* storage) : width_(width), storage_(storage) {
    while ((int64_t{1} << (levels_ - 2)) < max_parts) ++levels_;
  }
  static int64_t StorageElements(int64_t width, int64_t max_parts) {
    int levels = 2;
    while ((int64_t{1} << (levels - 2)) < max_parts) ++levels;
    return static_cast<int64_t>(levels) * 2 * width;
  }
  // The next free slot; fill its arrays, then call Push.
  Moments<Acc> Slot() {
    const int64_t k = size_;
    return Moments<Acc>{0, storage_ + 2 * k * width_, storage_ + (2 * k + 1) * width_};
  }
  void Push(const Moments<Acc>& m) {
    parts_[size_++] = m;
    ++pushed_;
    for (int64_t count = pushed_; count % 2 == 0 && size_ >= 2; count /= 2) MergeTop();
  }
  // Merges what is left, latest into earlier; the result is in the first slot.
  Moments<Acc> Finish() {
    while (size_ > 1) MergeTop();
    return parts_[0];
  }

 private:
  void MergeTop() {
    --size_;
    Merge(parts_[size_ - 1], parts_[size_], width_);
  }
  int64_t width_;
  Acc* storage_;
  int levels_ = 2;
  int size_ = 0;
  int64_t pushed_ = 0;
  Moments<Acc> parts_[66];
};

// Walks the memory of the next work item with prefetch hints while the current one computes, a
// few cache lines per step, so that the next item is in cache when its turn comes. Groups of small
// tensors (a deep network's activations) live in separate allocations, where the hardware
// prefetcher starts afresh at every tensor and every page; large items stream well without help,
// so only their first lines are touched. Reads are fetched into L2 (prefetcht1), not L1: from
// memory, L1 prefetches of a whole small tensor leave the loop waiting on their misses.
class ItemPrefetcher {
 public:
  static constexpr int64_t kMaxBytes = int64_t{1} << 17;  // whole items up to this size

  ItemPrefetcher() = default;
  template <typename T>
  ItemPrefetcher(const void* data, int64_t cols, const WorkItem& item, bool write, T /*type*/)
      : write_(write) {
    const int64_t size = static_cast<int64_t>(sizeof(T));
    base_ = static_cast<const char*>(data) + (item.row_begin * cols + item.unit_begin) * size;
    const int64_t width = item.unit_end - item.unit_begin;
    const int64_t rows = item.row_end - item.row_begin;
    if (width == cols) {  // a run of whole rows: one contiguous range
      rows_ = 1;
      row_bytes_ = rows * width * size;
    } else {
      rows_ = rows;
      row_bytes_ = width * size;
      stride_ = cols * size;
    }
    if (rows_ * row_bytes_ > kMaxBytes) {  // the hardware prefetcher takes over after the start
      rows_ = std::min<int64_t>(rows_, 8);
      row_bytes_ = std::min<int64_t>(row_bytes_, 512);
    }
    lines_ = rows_ * ((row_bytes_ + 63) / 64);
  }
  int64_t Lines() const { return lines_; }
  void Advance(int64_t lines) {
    for (; lines > 0 && row_ < rows_; --lines) {
      const char* p = base_ + row_ * stride_ + offset_;
      if (write_) __builtin_prefetch(p, 1, 3);
      else __builtin_prefetch(p, 0, 2);
      offset_ += 64;
      if (offset_ >= row_bytes_) {
        offset_ = 0;
        ++row_;
      }
    }
  }

 private:
  const char* base_ = nullptr;
  int64_t stride_ = 0, row_bytes_ = 0, rows_ = 0, lines_ = 0;
  int64_t row_ = 0, offset_ = 0;
  bool write_ = false;
};

// Blocks of at most this many whole vectors of units are narrow: their loops keep accumulators
// and per-unit factors in registers (the tiles below). A deep network's layers are this narrow
// (32 or 64 units of float32 are 4 or 8 vectors).
constexpr int64_t kNarrowVectors = 8;
template <typename T>
constexpr int64_t NarrowUnits() { return kNarrowVectors * Simd<typename Elem<T>::Acc>::kLanes; }

// The centering passes subtract c = fl(pivot + mean) (one subtraction per element; x - c is exact
// where x and c are within a factor of two of each other, as under a large offset) and so sum
// (x - c)^2 = M2 + n delta^2, delta = c - (pivot + mean). delta, the rounding error of that
// addition, is exactly (c - pivot) - mean where |pivot| >= |mean|, the case of an offset; elsewhere
// it is tiny against the spread anyway. Returns M2 = sum - n delta^2, at least 0 (NaN stays NaN).
template <typename L>
inline typename L::V RemoveCenterError(typename L::V sum, typename L::V center, typename L::V pivot,
                                       typename L::V mean, typename L::Acc n) {
  const auto delta = (center - pivot) - mean;
  const auto m2 = sum - n * (delta * delta);
  return m2 < L::Splat(0) ? L::Splat(0) : m2;
}

// Register tiles for narrow blocks: K vectors of units (or K = 1 single units) summed over the
// chunk's rows with the accumulators in registers, rows innermost. The arithmetic is that of
// ChunkSum / ChunkM2 below (four rows pairwise, then into the running sum), but a unit loop over a
// few vectors would carry each accumulator through a store and a reload per four rows.
template <typename T, bool kVec, int K>
inline void TileMean(const T* x, int64_t cols, int64_t rb, int64_t re,
                     typename Elem<T>::Acc inv_n, const typename Elem<T>::Acc* __restrict__ pivot,
                     typename Elem<T>::Acc* __restrict__ mean, ItemPrefetcher& next,
                     int64_t lines_per_group) {
  using L = Lane<T, kVec>;
  constexpr int64_t W = L::kWidth;
  typename L::V acc[K], p[K];
  for (int k = 0; k < K; ++k) {
    acc[k] = L::Splat(0);
    p[k] = L::LoadAcc(pivot + k * W);
  }
  int64_t r = rb;
  for (; r + 4 <= re; r += 4) {
    const T* __restrict__ x0 = x + r * cols;
    const T* __restrict__ x1 = x0 + cols;
    const T* __restrict__ x2 = x1 + cols;
    const T* __restrict__ x3 = x2 + cols;
    for (int k = 0; k < K; ++k)
      acc[k] = acc[k] + (((L::Load(x0 + k * W) - p[k]) + (L::Load(x1 + k * W) - p[k])) +
                         ((L::Load(x2 + k * W) - p[k]) + (L::Load(x3 + k * W) - p[k])));
    next.Advance(lines_per_group);
  }
  for (; r < re; ++r) {
    const T* __restrict__ x0 = x + r * cols;
    for (int k = 0; k < K; ++k) acc[k] = acc[k] + (L::Load(x0 + k * W) - p[k]);
  }
  for (int k = 0; k < K; ++k) L::StoreAcc(mean + k * W, acc[k] * inv_n);
}

template <typename T, bool kVec, int K>
inline void TileM2(const T* x, int64_t cols, int64_t rb, int64_t re,
                   const typename Elem<T>::Acc* __restrict__ pivot,
                   const typename Elem<T>::Acc* __restrict__ mean,
                   typename Elem<T>::Acc* __restrict__ m2) {
  using L = Lane<T, kVec>;
  using Acc = typename Elem<T>::Acc;
  constexpr int64_t W = L::kWidth;
  typename L::V acc[K], center[K];
  for (int k = 0; k < K; ++k) {
    acc[k] = L::Splat(0);
    center[k] = L::LoadAcc(pivot + k * W) + L::LoadAcc(mean + k * W);
  }
  int64_t r = rb;
  for (; r + 4 <= re; r += 4) {
    const T* __restrict__ x0 = x + r * cols;
    const T* __restrict__ x1 = x0 + cols;
    const T* __restrict__ x2 = x1 + cols;
    const T* __restrict__ x3 = x2 + cols;
    for (int k = 0; k < K; ++k) {
      const auto d0 = L::Load(x0 + k * W) - center[k], d1 = L::Load(x1 + k * W) - center[k];
      const auto d2 = L::Load(x2 + k * W) - center[k], d3 = L::Load(x3 + k * W) - center[k];
      acc[k] = acc[k] + ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3));
    }
  }
  for (; r < re; ++r) {
    const T* __restrict__ x0 = x + r * cols;
    for (int k = 0; k < K; ++k) {
      const auto d = L::Load(x0 + k * W) - center[k];
      acc[k] = acc[k] + d * d;
    }
  }
  const Acc n = static_cast<Acc>(re - rb);
  for (int k = 0; k < K; ++k)
    L::StoreAcc(m2 + k * W, RemoveCenterError<L>(acc[k], center[k], L::LoadAcc(pivot + k * W),
                                                  L::LoadAcc(mean + k * W), n));
}

// Both passes of one chunk of a narrow block (at most NarrowUnits<T>() units): (mean, M2) of rows
// [rb, re). The sum pass, which reads the chunk from memory, takes all whole vectors of a row in
// one tile, so the rows stream front to back; the centering pass reads the chunk from L1 in tiles
// of at most four vectors (accumulators and means in registers).
template <typename T>
inline void NarrowChunk(const T* x, int64_t cols, int64_t rb, int64_t re, int64_t width,
                        const typename Elem<T>::Acc* __restrict__ pivot,
                        typename Elem<T>::Acc* __restrict__ mean,
                        typename Elem<T>::Acc* __restrict__ m2, ItemPrefetcher& next,
                        int64_t lines_per_group) {
  using Acc = typename Elem<T>::Acc;
  constexpr int64_t W = Simd<Acc>::kLanes;
  const Acc inv_n = Acc(1) / static_cast<Acc>(re - rb);
  const int64_t vectors = width / W;
  switch (vectors) {
#define LBE_NARROW_CASE(K) \
    case K: TileMean<T, true, K>(x, cols, rb, re, inv_n, pivot, mean, next, lines_per_group); break;
    LBE_NARROW_CASE(1) LBE_NARROW_CASE(2) LBE_NARROW_CASE(3) LBE_NARROW_CASE(4)
    LBE_NARROW_CASE(5) LBE_NARROW_CASE(6) LBE_NARROW_CASE(7) LBE_NARROW_CASE(8)
#undef LBE_NARROW_CASE
    default: break;
  }
  for (int64_t j = vectors * W; j < width; ++j)
    TileMean<T, false, 1>(x + j, cols, rb, re, inv_n, pivot + j, mean + j, next, 0);
  int64_t j = 0;
  for (; j + 4 * W <= width; j += 4 * W) TileM2<T, true, 4>(x + j, cols, rb, re, pivot + j, mean + j, m2 + j);
  switch ((width - j) / W) {
    case 3: TileM2<T, true, 3>(x + j, cols, rb, re, pivot + j, mean + j, m2 + j); j += 3 * W; break;
    case 2: TileM2<T, true, 2>(x + j, cols, rb, re, pivot + j, mean + j, m2 + j); j += 2 * W; break;
    case 1: TileM2<T, true, 1>(x + j, cols, rb, re, pivot + j, mean + j, m2 + j); j += W; break;
    default: break;
  }
  for (; j < width; ++j) TileM2<T, false, 1>(x + j, cols, rb, re, pivot + j, mean + j, m2 + j);
}

// Sum pass over rows [rb, re) of one chunk: sum[j] = sum of x[r, j], four rows at a time.
template <typename T>
inline void ChunkSum(const T* x, int64_t cols, int64_t rb, int64_t re, int64_t width,
                     const typename Elem<T>::Acc* __restrict__ pivot,
                     typename Elem<T>::Acc* __restrict__ sum, ItemPrefetcher& next,
                     int64_t lines_per_group) {
  ForUnits<T>(width, [&](auto vec, int64_t j) { using L = Lane<T, decltype(vec)::value>;
    L::StoreAcc(sum + j, L::Splat(0));
  });
  int64_t r = rb;
  for (; r + 4 <= re; r += 4) {
    const T* __restrict__ x0 = x + r * cols;
    const T* __restrict__ x1 = x0 + cols;
    const T* __restrict__ x2 = x1 + cols;
    const T* __restrict__ x3 = x2 + cols;
    ForUnits<T>(width, [&](auto vec, int64_t j) {
      using L = Lane<T, decltype(vec)::value>;
      const auto p = L::LoadAcc(pivot + j);
      L::StoreAcc(sum + j, L::LoadAcc(sum + j) + (((L::Load(x0 + j) - p) + (L::Load(x1 + j) - p)) +
                                                  ((L::Load(x2 + j) - p) + (L::Load(x3 + j) - p))));
    });
    next.Advance(lines_per_group);
  }
  for (; r < re; ++r) {
    const T* __restrict__ x0 = x + r * cols;
    ForUnits<T>(width, [&](auto vec, int64_t j) {
      using L = Lane<T, decltype(vec)::value>;
      L::StoreAcc(sum + j, L::LoadAcc(sum + j) + (L::Load(x0 + j) - L::LoadAcc(pivot + j)));
    });
  }
}

// Centering pass: m2[j] = sum of (x[r, j] - mean[j])^2 over the chunk, four rows at a time.
template <typename T>
inline void ChunkM2(const T* x, int64_t cols, int64_t rb, int64_t re, int64_t width,
                    const typename Elem<T>::Acc* __restrict__ pivot,
                    const typename Elem<T>::Acc* __restrict__ mean,
                    typename Elem<T>::Acc* __restrict__ m2) {
  using Acc = typename Elem<T>::Acc;
  ForUnits<T>(width, [&](auto vec, int64_t j) { using L = Lane<T, decltype(vec)::value>;
    L::StoreAcc(m2 + j, L::Splat(0));
  });
  int64_t r = rb;
  for (; r + 4 <= re; r += 4) {
    const T* __restrict__ x0 = x + r * cols;
    const T* __restrict__ x1 = x0 + cols;
    const T* __restrict__ x2 = x1 + cols;
    const T* __restrict__ x3 = x2 + cols;
    ForUnits<T>(width, [&](auto vec, int64_t j) {
      using L = Lane<T, decltype(vec)::value>;
      const auto c = L::LoadAcc(pivot + j) + L::LoadAcc(mean + j);
      const auto d0 = L::Load(x0 + j) - c, d1 = L::Load(x1 + j) - c;
      const auto d2 = L::Load(x2 + j) - c, d3 = L::Load(x3 + j) - c;
      L::StoreAcc(m2 + j, L::LoadAcc(m2 + j) + ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)));
    });
  }
  for (; r < re; ++r) {
    const T* __restrict__ x0 = x + r * cols;
    ForUnits<T>(width, [&](auto vec, int64_t j) {
      using L = Lane<T, decltype(vec)::value>;
      const auto d = L::Load(x0 + j) - (L::LoadAcc(pivot + j) + L::LoadAcc(mean + j));
      L::StoreAcc(m2 + j, L::LoadAcc(m2 + j) + d * d);
    });
  }
  const Acc n = static_cast<Acc>(re - rb);
  ForUnits<T>(width, [&](auto vec, int64_t j) {
    using L = Lane<T, decltype(vec)::value>;
    const auto p = L::LoadAcc(pivot + j), mu = L::LoadAcc(mean + j);
    L::StoreAcc(m2 + j, RemoveCenterError<L>(L::LoadAcc(m2 + j), p + mu, p, mu, n));
  });
}

// Statistics of rows [r0, r1) of units [u0, u0 + width) of x ([rows, cols]), written into out;
// the mean is that of x - pivot.
template <typename T>
void BlockMoments(const T* x, int64_t cols, int64_t u0, int64_t width, int64_t r0, int64_t r1,
                  const typename Elem<T>::Acc* pivot, typename Elem<T>::Acc* out_mean,
                  typename Elem<T>::Acc* out_m2, int64_t* out_n, ItemPrefetcher& next) {
  using Acc = typename Elem<T>::Acc;
  const int64_t chunks = (r1 - r0 + kChunkRows - 1) / kChunkRows;
  const T* base = x + u0;
  const int64_t groups = std::max<int64_t>(1, (r1 - r0) / 4);
  const int64_t lines_per_group = (next.Lines() + groups - 1) / groups;
  const bool narrow = width <= NarrowUnits<T>();
  if (chunks == 1) {  // one chunk: straight into the outputs
    if (narrow) {
      NarrowChunk<T>(base, cols, r0, r1, width, pivot, out_mean, out_m2, next, lines_per_group);
      *out_n = r1 - r0;
      return;
    }
    ChunkSum<T>(base, cols, r0, r1, width, pivot, out_mean, next, lines_per_group);
    const Acc inv_n = Acc(1) / static_cast<Acc>(r1 - r0);
    ForUnits<T>(width, [&](auto vec, int64_t j) {
      using L = Lane<T, decltype(vec)::value>;
      L::StoreAcc(out_mean + j, L::LoadAcc(out_mean + j) * inv_n);
    });
    ChunkM2<T>(base, cols, r0, r1, width, pivot, out_mean, out_m2);
    *out_n = r1 - r0;
    return;
  }
  Acc* storage = Scratch<Acc>(PairwiseMerger<Acc>::StorageElements(width, chunks));
  PairwiseMerger<Acc> merger(width, chunks, storage);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t rb = r0 + c * kChunkRows;
    const int64_t re = std::min(r1, rb + kChunkRows);
    Moments<Acc> m = merger.Slot();
    if (narrow) {
      NarrowChunk<T>(base, cols, rb, re, width, pivot, m.mean, m.m2, next, lines_per_group);
      m.n = re - rb;
      merger.Push(m);
      continue;
    }
    ChunkSum<T>(base, cols, rb, re, width, pivot, m.mean, next, lines_per_group);
    const Acc inv_n = Acc(1) / static_cast<Acc>(re - rb);
    ForUnits<T>(width, [&](auto vec, int64_t j) {
      using L = Lane<T, decltype(vec)::value>;
      L::StoreAcc(m.mean + j, L::LoadAcc(m.mean + j) * inv_n);
    });
    ChunkM2<T>(base, cols, rb, re, width, pivot, m.mean, m.m2);
    m.n = re - rb;
    merger.Push(m);
  }
  const Moments<Acc> total = merger.Finish();
  std::memcpy(out_mean, total.mean, sizeof(Acc) * width);
  std::memcpy(out_m2, total.m2, sizeof(Acc) * width);
  *out_n = total.n;
}

// log1p(z) to float precision for z >= 0 (or NaN, +inf) given in float, four at a time in double:
// u = 1 + z is exact for z >= 2^-29, so log1p(z) = log(u) = e * ln2 + 2 atanh((m - 1) / (m + 1))
// with u = 2^e * m, m in [sqrt(1/2), sqrt(2)); below 2^-29 log1p(z) = z to float precision. The
// series' truncation error is below 1e-11, far under a float ulp. (One libm log1pf call per unit
// was the largest cost of groups of many small tensors.)
inline D4 Log1pFloatPrecision(D4 z) {
  const D4 u = z + 1.0;
  const U4 bits = Bits<U4>(u);
  // The biased exponent as a double, exactly, without AVX2's missing int64 -> double conversion.
  D4 exponent = Bits<D4>(((bits >> 52) & 0x7ffu) | 0x4330000000000000u) - (0x1p52 + 1023.0);
  D4 m = Bits<D4>((bits & 0x000fffffffffffffu) | 0x3ff0000000000000u);
  const I4 high = m > 1.4142135623730951;
  m = high ? m * 0.5 : m;
  exponent = high ? exponent + 1.0 : exponent;
  const D4 t = (m - 1.0) / (m + 1.0);
  const D4 t2 = t * t;
  const D4 series =
      1.0 + t2 * (1.0 / 3 + t2 * (1.0 / 5 + t2 * (1.0 / 7 + t2 * (1.0 / 9 + t2 * (1.0 / 11)))));
  const D4 log_u = exponent * 0.69314718055994531 + 2.0 * t * series;
  D4 result = z < 0x1p-29 ? z : log_u;
  result = ((u == u) & (u != __builtin_huge_val())) ? result : u;  // NaN and +inf pass through
  return result;
}

// Pivots of units [u0, u0 + width) of x ([rows, cols]): their values in row 0, or 0 where that is
// not finite (x - Inf would turn every value of the unit into NaN). Every row segment of a unit
// shifts by the same pivot, so segments merge as usual.
template <typename T>
inline void LoadPivots(const T* x, int64_t u0, int64_t width, typename Elem<T>::Acc* pivot) {
  using Acc = typename Elem<T>::Acc;
  for (int64_t j = 0; j < width; ++j) {
    const Acc v = Elem<T>::Load(x + u0 + j);
    pivot[j] = v - v == Acc(0) ? v : Acc(0);
  }
}

// Turns M2 into the variance in place and returns the block's sum of unit entropies.
template <typename Acc>
double EntropyOfBlock(Acc* variance_inout, int64_t width, int64_t n, int64_t ddof) {
  const Acc inv_dof = Acc(1) / static_cast<Acc>(n - ddof);
  const Acc pi_e = static_cast<Acc>(kPiE);
  double sum = 0.0;
  if constexpr (std::is_same_v<Acc, float>) {
    // Lane-wise sums in double, combined in a fixed order at the end; padding lanes add log1p(0).
    D4 lane_sums{};
    for (int64_t j = 0; j < width; j += 8) {
      F8 v{};
      if (j + 8 <= width) {
        v = Simd<float>::Load(variance_inout + j) * inv_dof;
        Simd<float>::Store(variance_inout + j, v);
      } else {
        for (int64_t k = 0; j + k < width; ++k) {
          v[k] = variance_inout[j + k] * inv_dof;
          variance_inout[j + k] = v[k];
        }
      }
      const F8 z = pi_e * v;
      F4 halves[2];
      std::memcpy(halves, &z, sizeof(z));
      const D4 low = __builtin_convertvector(halves[0], D4);
      const D4 high = __builtin_convertvector(halves[1], D4);
      lane_sums += 0.5 * Log1pFloatPrecision(low);
      lane_sums += 0.5 * Log1pFloatPrecision(high);
    }
    sum = (lane_sums[0] + lane_sums[1]) + (lane_sums[2] + lane_sums[3]);
  } else {
    for (int64_t j = 0; j < width; ++j) {
      const Acc v = variance_inout[j] * inv_dof;
      variance_inout[j] = v;
      sum += static_cast<double>(Acc(0.5) * std::log1p(pi_e * v));
    }
  }
  return sum;
}

// Finishes a block of units [u0, u0 + width) of x ([rows, cols]) whose shifted moments over all
// rows are in mean_inout (mean of x - pivot) and var_inout (M2): writes the mean and the variance
// and returns the block's sum of unit entropies. A non-finite sum (an Inf or NaN in the input, a
// sum of squares beyond the accumulator's range, or pi*e*var beyond it) sends the units whose
// statistics are not finite to the wide path (batch_entropy_wide.h), which gives the finite
// entropy of finite input and the formula's NaN and Inf otherwise.
template <typename T>
double FinishBlock(const T* x, int64_t rows, int64_t cols, int64_t u0, int64_t width, int64_t ddof,
                   const typename Elem<T>::Acc* pivot, typename Elem<T>::Acc* mean_inout,
                   typename Elem<T>::Acc* var_inout) {
  using Acc = typename Elem<T>::Acc;
  for (int64_t j = 0; j < width; ++j) mean_inout[j] += pivot[j];
  const double sum = EntropyOfBlock<Acc>(var_inout, width, rows, ddof);
  if (sum - sum == 0.0) return sum;
  const Acc pi_e = static_cast<Acc>(kPiE);
  double wide_sum = 0.0;
  for (int64_t j = 0; j < width; ++j) {
    const Acc v = var_inout[j], z = pi_e * v, m = mean_inout[j];
    if (z - z == Acc(0) && m - m == Acc(0)) {
      wide_sum += 0.5 * std::log1p(static_cast<double>(z));
      continue;
    }
    const T* column = x + u0 + j;
    const wide::UnitMoments wm = wide::ComputeUnitMoments(
        [&](int64_t r) { return static_cast<double>(Elem<T>::Load(column + r * cols)); }, rows, ddof);
    mean_inout[j] = static_cast<Acc>(wm.mean);
    var_inout[j] = static_cast<Acc>(wm.Variance());
    wide_sum += wm.entropy;
  }
  return wide_sum;
}

// Runs fn(item) for every item of the plan, shard by shard on the thread pool; a plan of one shard
// runs on the calling thread.
template <typename Fn>
void RunItems(const Plan& plan, const ParallelFor& parallel_for, int64_t cost_per_element,
              const Fn& fn) {
  const int64_t shards = plan.NumShards();
  auto run_shards = [&](int64_t begin, int64_t end) {
    for (int64_t i = plan.shard_begin[begin]; i < plan.shard_begin[end]; ++i) fn(i);
  };
  if (shards <= 1) {
    run_shards(0, shards);
    return;
  }
  parallel_for(shards, kShardElements * cost_per_element, run_shards);
}

template <typename T>
void ForwardTyped(const ForwardArgs& args, const ParallelFor& parallel_for) {
  using Acc = typename Elem<T>::Acc;
  const Plan plan = MakePlan(args.num_tensors, args.batch, args.units, kForwardBlockUnits, kChunkRows);
  std::vector<Acc> partial(2 * plan.partial_elements);
  Acc* partial_mean = partial.data();
  Acc* partial_m2 = partial.data() + plan.partial_elements;
  std::vector<int64_t> partial_n(plan.multi_segment_blocks > 0 ? plan.items.size() : 0);
  std::vector<double> block_entropy(plan.blocks.size());

  const int64_t num_items = static_cast<int64_t>(plan.items.size());
  RunItems(plan, parallel_for, 2, [&](int64_t i) {
    const WorkItem& item = plan.items[i];
    ItemPrefetcher next;
    if (i + 1 < num_items) {
      const WorkItem& n = plan.items[i + 1];
      next = ItemPrefetcher(args.x[n.tensor], args.units[n.tensor], n, false, T{});
    }
    const T* x = static_cast<const T*>(args.x[item.tensor]);
    const int64_t cols = args.units[item.tensor];
    const int64_t width = item.unit_end - item.unit_begin;
    alignas(32) Acc pivot[kForwardBlockUnits];
    LoadPivots<T>(x, item.unit_begin, width, pivot);
    if (item.num_segments == 1) {
      Acc* mean = static_cast<Acc*>(args.mean[item.tensor]) + item.unit_begin;
      Acc* var = static_cast<Acc*>(args.variance[item.tensor]) + item.unit_begin;
      int64_t n = 0;
      BlockMoments<T>(x, cols, item.unit_begin, width, item.row_begin, item.row_end, pivot, mean,
                      var, &n, next);
      block_entropy[item.block] = FinishBlock<T>(x, n, cols, item.unit_begin, width, args.ddof,
                                                 pivot, mean, var);
    } else {
      BlockMoments<T>(x, cols, item.unit_begin, width, item.row_begin, item.row_end, pivot,
                      partial_mean + item.partial_offset, partial_m2 + item.partial_offset,
                      &partial_n[i], next);
    }
  });

  if (plan.multi_segment_blocks > 0) {
    auto merge_block = [&](int64_t b) {
      const BlockInfo& info = plan.blocks[b];
      if (info.num_segments == 1) return;
      const int64_t width = info.unit_end - info.unit_begin;
      std::vector<Acc> storage(PairwiseMerger<Acc>::StorageElements(width, info.num_segments));
      PairwiseMerger<Acc> merger(width, info.num_segments, storage.data());
      for (int64_t s = 0; s < info.num_segments; ++s) {
        const int64_t i = info.first_item + s;
        Moments<Acc> m = merger.Slot();
        std::memcpy(m.mean, partial_mean + plan.items[i].partial_offset, sizeof(Acc) * width);
        std::memcpy(m.m2, partial_m2 + plan.items[i].partial_offset, sizeof(Acc) * width);
        m.n = partial_n[i];
        merger.Push(m);
      }
      const Moments<Acc> total = merger.Finish();
      Acc* mean = static_cast<Acc*>(args.mean[info.tensor]) + info.unit_begin;
      Acc* var = static_cast<Acc*>(args.variance[info.tensor]) + info.unit_begin;
      std::memcpy(mean, total.mean, sizeof(Acc) * width);
      std::memcpy(var, total.m2, sizeof(Acc) * width);
      const T* x = static_cast<const T*>(args.x[info.tensor]);
      alignas(32) Acc pivot[kForwardBlockUnits];
      LoadPivots<T>(x, info.unit_begin, width, pivot);
      block_entropy[b] = FinishBlock<T>(x, total.n, args.units[info.tensor], info.unit_begin,
                                        width, args.ddof, pivot, mean, var);
    };
    // Merging touches 2 * partial_elements values: on the pool only when that is real work.
    const int64_t num_blocks = static_cast<int64_t>(plan.blocks.size());
    if (plan.partial_elements < kShardElements || num_blocks == 1) {
      for (int64_t b = 0; b < num_blocks; ++b) merge_block(b);
    } else {
      const int64_t segments_per_block = std::max<int64_t>(1, plan.items.size() / num_blocks);
      parallel_for(num_blocks, 4 * kForwardBlockUnits * segments_per_block,
                   [&](int64_t begin, int64_t end) {
                     for (int64_t b = begin; b < end; ++b) merge_block(b);
                   });
    }
  }

  T* entropy = static_cast<T*>(args.entropy);
  for (int64_t t = 0; t < args.num_tensors; ++t) {
    double sum = 0.0;
    for (int64_t b = plan.first_block_of_tensor[t]; b < plan.first_block_of_tensor[t + 1]; ++b)
      sum += block_entropy[b];
    Elem<T>::Store(entropy + t, static_cast<Acc>(sum / static_cast<double>(args.units[t])));
  }
}

// dx = (x - mean) * scale + shift over rows [rb, re) of a narrow block (at most kNarrowVectors
// vectors of units): K whole vectors with their per-unit factors in registers, then the units past
// the last whole vector one at a time; rows front to back, so x and dx stream.
template <typename T, int K>
inline void NarrowBackwardK(const T* x, T* dx, int64_t cols, int64_t rb, int64_t re,
                            int64_t width, const typename Elem<T>::Acc* __restrict__ mean,
                            const typename Elem<T>::Acc* __restrict__ scale,
                            const typename Elem<T>::Acc* __restrict__ shift) {
  using L = Lane<T, true>;
  using S = Lane<T, false>;
  constexpr int64_t W = L::kWidth;
  typename L::V mu[K > 0 ? K : 1], s[K > 0 ? K : 1], t[K > 0 ? K : 1];
  for (int k = 0; k < K; ++k) {
    mu[k] = L::LoadAcc(mean + k * W);
    s[k] = L::LoadAcc(scale + k * W);
    t[k] = L::LoadAcc(shift + k * W);
  }
  for (int64_t r = rb; r < re; ++r) {
    const T* __restrict__ xr = x + r * cols;
    T* __restrict__ dr = dx + r * cols;
    for (int k = 0; k < K; ++k) L::Store(dr + k * W, (L::Load(xr + k * W) - mu[k]) * s[k] + t[k]);
    for (int64_t j = K * W; j < width; ++j)
      S::Store(dr + j, (S::Load(xr + j) - mean[j]) * scale[j] + shift[j]);
  }
}

template <typename T>
inline void NarrowBackward(const T* x, T* dx, int64_t cols, int64_t rb, int64_t re, int64_t width,
                           const typename Elem<T>::Acc* mean, const typename Elem<T>::Acc* scale,
                           const typename Elem<T>::Acc* shift) {
  constexpr int64_t W = Simd<typename Elem<T>::Acc>::kLanes;
  switch (width / W) {
#define LBE_NARROW_CASE(K) \
    case K: return NarrowBackwardK<T, K>(x, dx, cols, rb, re, width, mean, scale, shift);
    LBE_NARROW_CASE(0) LBE_NARROW_CASE(1) LBE_NARROW_CASE(2) LBE_NARROW_CASE(3)
    LBE_NARROW_CASE(4) LBE_NARROW_CASE(5) LBE_NARROW_CASE(6) LBE_NARROW_CASE(7)
    LBE_NARROW_CASE(8)
#undef LBE_NARROW_CASE
    default: break;
  }
}

// Rows [rb, re) of units [u0, u0 + width) of tensor t on the wide path, in double: units whose
// variance is huge (or overflowed the statistics type: then it is recomputed from the column).
template <typename T>
void WideBackwardItem(const BackwardArgs& args, int64_t t, int64_t u0, int64_t width, int64_t rb,
                      int64_t re) {
  using Acc = typename Elem<T>::Acc;
  const int64_t rows = args.batch[t], cols = args.units[t];
  const T* x = static_cast<const T*>(args.x[t]);
  T* dx = static_cast<T*>(args.dx[t]);
  const Acc* mean = static_cast<const Acc*>(args.mean[t]);
  const Acc* var = static_cast<const Acc*>(args.variance[t]);
  const Acc* grad_mean = args.grad_mean ? static_cast<const Acc*>(args.grad_mean[t]) : nullptr;
  const Acc* grad_var = args.grad_variance ? static_cast<const Acc*>(args.grad_variance[t]) : nullptr;
  const double g = static_cast<double>(Elem<T>::Load(static_cast<const T*>(args.grad_entropy) + t));
  const double dof = static_cast<double>(rows - args.ddof);
  for (int64_t j = u0; j < u0 + width; ++j) {
    const double v = static_cast<double>(var[j]);
    double scaled_variance = v;
    int k = 0;
    if (v == static_cast<double>(std::numeric_limits<Acc>::infinity())) {
      const T* column = x + j;
      const wide::UnitMoments wm = wide::ComputeUnitMoments(
          [&](int64_t r) { return static_cast<double>(Elem<T>::Load(column + r * cols)); }, rows,
          args.ddof);
      scaled_variance = wm.scaled_variance;
      k = wm.k;
    } else {
      k = wide::VarianceExponent(v);
      scaled_variance = wide::Scale2(v, -2 * k);
    }
    const wide::UnitGradient u = wide::ComputeUnitGradient(
        static_cast<double>(mean[j]), scaled_variance, k, g, static_cast<double>(cols), dof,
        grad_var ? static_cast<double>(grad_var[j]) : 0.0,
        grad_mean ? static_cast<double>(grad_mean[j]) : 0.0, static_cast<double>(rows));
    for (int64_t r = rb; r < re; ++r) {
      const double xv = static_cast<double>(Elem<T>::Load(x + r * cols + j));
      Elem<T>::Store(dx + r * cols + j, static_cast<Acc>(u.Dx(xv)));
    }
  }
}

template <typename T>
void BackwardTyped(const BackwardArgs& args, const ParallelFor& parallel_for) {
  using Acc = typename Elem<T>::Acc;
  const Plan plan = MakePlan(args.num_tensors, args.batch, args.units, kBackwardBlockUnits, 1);
  const T* grad_entropy = static_cast<const T*>(args.grad_entropy);

  const int64_t num_items = static_cast<int64_t>(plan.items.size());
  RunItems(plan, parallel_for, 3, [&](int64_t i) {
    const WorkItem& item = plan.items[i];
    const int64_t t = item.tensor, u0 = item.unit_begin, cols = args.units[t];
    const int64_t width = item.unit_end - u0;
    const int64_t rows = args.batch[t];
    Acc* scratch = Scratch<Acc>(2 * kBackwardBlockUnits);
    Acc* __restrict__ scale = scratch;
    Acc* __restrict__ shift = scratch + kBackwardBlockUnits;
    const Acc* __restrict__ mean = static_cast<const Acc*>(args.mean[t]) + u0;
    const Acc* __restrict__ var = static_cast<const Acc*>(args.variance[t]) + u0;
    const Acc* grad_mean = args.grad_mean && args.grad_mean[t]
                               ? static_cast<const Acc*>(args.grad_mean[t]) + u0 : nullptr;
    const Acc* grad_var = args.grad_variance && args.grad_variance[t]
                              ? static_cast<const Acc*>(args.grad_variance[t]) + u0 : nullptr;
    // dH/dx = pi*e * (x - mu) / (U * (B - ddof) * (pi*e*v + 1)); dv/dx = 2 (x - mu) / (B - ddof);
    // dmu/dx = 1 / B.
    const Acc g = Elem<T>::Load(grad_entropy + t);
    const double dof = static_cast<double>(rows - args.ddof);
    const Acc entropy_factor = static_cast<Acc>(kPiE / (static_cast<double>(cols) * dof));
    const Acc var_factor = static_cast<Acc>(2.0 / dof);
    const Acc mean_factor = static_cast<Acc>(1.0 / static_cast<double>(rows));
    const Acc pi_e = static_cast<Acc>(kPiE);
    const Acc numerator = g * entropy_factor;
    // The largest variance of the item, NaN ignored: above the threshold the factor s loses
    // precision or underflows, and the item takes the wide path.
    typename Simd<Acc>::V max_var_v = Lane<T, true>::Splat(Acc(0));
    Acc max_var = Acc(0);
    ForUnits<T>(width, [&](auto vec, int64_t j) {
      using L = Lane<T, decltype(vec)::value>;
      const auto v = L::LoadAcc(var + j);
      auto s = L::Splat(numerator) / (pi_e * v + Acc(1));
      if (grad_var) s += L::LoadAcc(grad_var + j) * var_factor;
      L::StoreAcc(scale + j, s);
      L::StoreAcc(shift + j, grad_mean ? L::LoadAcc(grad_mean + j) * mean_factor : L::Splat(Acc(0)));
      if constexpr (decltype(vec)::value) max_var_v = v > max_var_v ? v : max_var_v;
      else max_var = v > max_var ? v : max_var;
    });
    for (int64_t k = 0; k < Simd<Acc>::kLanes; ++k) max_var = std::max(max_var, max_var_v[k]);
    const T* x = static_cast<const T*>(args.x[t]) + u0;
    T* dx = static_cast<T*>(args.dx[t]) + u0;
    if (static_cast<double>(max_var) >
        wide::WideVarianceThreshold(static_cast<double>(numerator), std::is_same_v<Acc, double>)) {
      WideBackwardItem<T>(args, t, u0, width, item.row_begin, item.row_end);
      return;
    }
    if (width <= NarrowUnits<T>()) {
      NarrowBackward<T>(x, dx, cols, item.row_begin, item.row_end, width, mean, scale, shift);
      return;
    }
    // Wide items: the first lines of the next item (the whole of it, if it is small), a few per row.
    ItemPrefetcher next_x, next_dx;
    if (i + 1 < num_items) {
      const WorkItem& n = plan.items[i + 1];
      next_x = ItemPrefetcher(args.x[n.tensor], args.units[n.tensor], n, false, T{});
      next_dx = ItemPrefetcher(args.dx[n.tensor], args.units[n.tensor], n, true, T{});
    }
    const int64_t item_rows = item.row_end - item.row_begin;
    const int64_t x_lines = (next_x.Lines() + item_rows - 1) / item_rows;
    const int64_t dx_lines = (next_dx.Lines() + item_rows - 1) / item_rows;
    for (int64_t r = item.row_begin; r < item.row_end; ++r) {
      const T* __restrict__ xr = x + r * cols;
      T* __restrict__ dr = dx + r * cols;
      next_x.Advance(x_lines);
      next_dx.Advance(dx_lines);
      ForUnits<T>(width, [&](auto vec, int64_t j) {
        using L = Lane<T, decltype(vec)::value>;
        L::Store(dr + j, (L::Load(xr + j) - L::LoadAcc(mean + j)) * L::LoadAcc(scale + j) +
                             L::LoadAcc(shift + j));
      });
    }
  });
}

using CpuTypes = ElementTypes<Half, BFloat16, float, double>;

inline void Forward(const ForwardArgs& args, const ParallelFor& parallel_for) {
  CpuTypes::Dispatch(
      args.dtype, [&](auto t) { ForwardTyped<typename decltype(t)::type>(args, parallel_for); }, [] {});
}

inline void Backward(const BackwardArgs& args, const ParallelFor& parallel_for) {
  CpuTypes::Dispatch(
      args.dtype, [&](auto t) { BackwardTyped<typename decltype(t)::type>(args, parallel_for); }, [] {});
}

}  // namespace LBE_CPU_ISA
}  // namespace cpu
}  // namespace lbe
