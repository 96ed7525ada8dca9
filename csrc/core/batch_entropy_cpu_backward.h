// Part of the CPU kernel bodies, compiled once per instruction set inside the namespace that
// LBE_CPU_ISA names; included through batch_entropy_cpu_impl.h only. This part: the
// backward pass.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CPU_BACKWARD_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CPU_BACKWARD_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "batch_entropy_common.h"
#include "batch_entropy_cpu.h"
#include "batch_entropy_cpu_items.h"
#include "batch_entropy_cpu_plan.h"
#include "batch_entropy_cpu_simd.h"
#include "batch_entropy_cpu_tiles.h"
#include "batch_entropy_wide.h"

namespace lbe {
namespace cpu {
namespace LBE_CPU_ISA {

// dx = (x - mean) * scale + shift over rows [rb, re) of a narrow block (shift holds the mean
// residual's share, see BackwardArgs) (at most kNarrowVectors
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
  const Acc* residual = args.mean_residual ? static_cast<const Acc*>(args.mean_residual[t]) : nullptr;
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
        static_cast<double>(mean[j]), residual ? static_cast<double>(residual[j]) : 0.0,
        scaled_variance, k, g, static_cast<double>(cols), dof,
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
    const Acc* residual = args.mean_residual && args.mean_residual[t]
                              ? static_cast<const Acc*>(args.mean_residual[t]) + u0 : nullptr;
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
      auto t = grad_mean ? L::LoadAcc(grad_mean + j) * mean_factor : L::Splat(Acc(0));
      if (residual) {
        // (x - mean - r) s + t = (x - mean) s + (t - r s); r = 0 leaves t as it is, even where
        // s is not finite.
        const auto r = L::LoadAcc(residual + j);
        t -= r == L::Splat(Acc(0)) ? L::Splat(Acc(0)) : r * s;
      }
      L::StoreAcc(shift + j, t);
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

}  // namespace LBE_CPU_ISA
}  // namespace cpu
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CPU_BACKWARD_H_
