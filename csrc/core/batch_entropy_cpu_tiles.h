// Part of the CPU kernel bodies, compiled once per instruction set inside the namespace that
// LBE_CPU_ISA names; included through batch_entropy_cpu_impl.h only. This part: the passes
// over one chunk of rows, in register tiles for narrow blocks and unit loops for wide ones.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CPU_TILES_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CPU_TILES_H_

#include <algorithm>
#include <cstdint>

#include "batch_entropy_cpu_items.h"
#include "batch_entropy_cpu_moments.h"
#include "batch_entropy_cpu_plan.h"
#include "batch_entropy_cpu_simd.h"

namespace lbe {
namespace cpu {
namespace LBE_CPU_ISA {

// Blocks of at most this many whole vectors of units are narrow: their loops keep accumulators
// and per-unit factors in registers (the tiles below). A deep network's layers are this narrow
// (32 or 64 units of float32 are 4 or 8 vectors).
constexpr int64_t kNarrowVectors = 8;
template <typename T>
constexpr int64_t NarrowUnits() { return kNarrowVectors * Simd<typename Elem<T>::Acc>::kLanes; }

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

}  // namespace LBE_CPU_ISA
}  // namespace cpu
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CPU_TILES_H_
