// Part of the CPU kernel bodies, compiled once per instruction set inside the namespace that
// LBE_CPU_ISA names; included through batch_entropy_cpu_impl.h only. This part: running
// statistics, their pairwise merging and the correction of the centering error.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CPU_MOMENTS_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CPU_MOMENTS_H_

#include <cstdint>
#include <vector>

#include "batch_entropy_cpu_simd.h"

namespace lbe {
namespace cpu {
namespace LBE_CPU_ISA {

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

}  // namespace LBE_CPU_ISA
}  // namespace cpu
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CPU_MOMENTS_H_
