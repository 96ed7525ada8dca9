// Part of the CPU kernel bodies, compiled once per instruction set inside the namespace that
// LBE_CPU_ISA names; included through batch_entropy_cpu_impl.h only. This part: the forward
// pass (statistics of each block, entropies, merging of row segments).
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CPU_FORWARD_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CPU_FORWARD_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "batch_entropy_common.h"
#include "batch_entropy_cpu.h"
#include "batch_entropy_cpu_items.h"
#include "batch_entropy_cpu_log1p.h"
#include "batch_entropy_cpu_moments.h"
#include "batch_entropy_cpu_plan.h"
#include "batch_entropy_cpu_simd.h"
#include "batch_entropy_cpu_tiles.h"
#include "batch_entropy_wide.h"

namespace lbe {
namespace cpu {
namespace LBE_CPU_ISA {

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
// rows are in mean_inout (mean of x - pivot) and var_inout (M2): writes the mean, the variance and
// (where residual_out is not null) the mean's rounding residual, and returns the block's sum of
// unit entropies. A non-finite sum (an Inf or NaN in the input, a
// sum of squares beyond the accumulator's range, or pi*e*var beyond it) sends the units whose
// statistics are not finite to the wide path (batch_entropy_wide.h), which gives the finite
// entropy of finite input and the formula's NaN and Inf otherwise.
template <typename T>
double FinishBlock(const T* x, int64_t rows, int64_t cols, int64_t u0, int64_t width, int64_t ddof,
                   const typename Elem<T>::Acc* pivot, typename Elem<T>::Acc* mean_inout,
                   typename Elem<T>::Acc* var_inout, typename Elem<T>::Acc* residual_out) {
  using Acc = typename Elem<T>::Acc;
  if (residual_out != nullptr) {
    // wide::SumResidual, vectorized: the rounding error of pivot + shifted mean (0 if not finite).
    ForUnits<T>(width, [&](auto vec, int64_t j) {
      using L = Lane<T, decltype(vec)::value>;
      const auto p = L::LoadAcc(pivot + j), shifted_mean = L::LoadAcc(mean_inout + j);
      const auto mean = p + shifted_mean;
      const auto b_part = mean - p;
      const auto residual = (p - (mean - b_part)) + (shifted_mean - b_part);
      L::StoreAcc(mean_inout + j, mean);
      L::StoreAcc(residual_out + j, mean - mean == L::Splat(Acc(0)) ? residual : L::Splat(Acc(0)));
    });
  } else {
    for (int64_t j = 0; j < width; ++j) mean_inout[j] += pivot[j];
  }
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
    if (residual_out != nullptr) residual_out[j] = wide::RoundedMeanResidual<Acc>(wm.mean, wm.mean_residual);
    var_inout[j] = static_cast<Acc>(wm.Variance());
    wide_sum += wm.entropy;
  }
  return wide_sum;
}

// Where tensor t's mean residuals from unit u0 on go, or null: not asked for.
template <typename Acc>
inline Acc* ResidualOut(const ForwardArgs& args, int64_t t, int64_t u0) {
  if (args.mean_residual == nullptr || args.mean_residual[t] == nullptr) return nullptr;
  return static_cast<Acc*>(args.mean_residual[t]) + u0;
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
                                                 pivot, mean, var,
                                                 ResidualOut<Acc>(args, item.tensor, item.unit_begin));
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
                                        width, args.ddof, pivot, mean, var,
                                        ResidualOut<Acc>(args, info.tensor, info.unit_begin));
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

}  // namespace LBE_CPU_ISA
}  // namespace cpu
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CPU_FORWARD_H_
