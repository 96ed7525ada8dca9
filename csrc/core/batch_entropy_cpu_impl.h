// The CPU kernel bodies. This header is compiled twice, once per instruction set (see
// batch_entropy_cpu_generic.cc and batch_entropy_cpu_avx2.cc), inside the namespace that
// LBE_CPU_ISA names; batch_entropy_cpu.cc picks one at run time.
//
// Statistics per unit block and row segment: for each chunk of kChunkRows rows, a sum pass and a
// centering pass (the chunk is in cache for the second), giving (n, mean, M2); chunks and then
// segments are merged pairwise (Chan et al.), so a mean far larger than the spread stays exact
// to rounding and the error grows with log(batch), not batch.
#ifndef LBE_CPU_ISA
#error "define LBE_CPU_ISA before including batch_entropy_cpu_impl.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "batch_entropy_common.h"
#include "batch_entropy_cpu.h"
#include "batch_entropy_cpu_plan.h"

namespace lbe {
namespace cpu {
namespace LBE_CPU_ISA {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

template <typename T> struct Elem;
template <> struct Elem<float> {
  using Acc = float;
  static inline float Load(const float* p) { return *p; }
  static inline void Store(float* p, float v) { *p = v; }
};
template <> struct Elem<double> {
  using Acc = double;
  static inline double Load(const double* p) { return *p; }
  static inline void Store(double* p, double v) { *p = v; }
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
};

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

// A stack of partial moments merged like a binary counter: pairwise summation of moments.
template <typename Acc>
class PairwiseMerger {
 public:
  PairwiseMerger(int64_t width, int64_t max_parts) : width_(width) {
    int levels = 2;
    while ((int64_t{1} << (levels - 2)) < max_parts) ++levels;
    storage_.resize(static_cast<size_t>(levels) * 2 * width);
    parts_.reserve(levels);
  }
  // The next free slot; fill its arrays, then call Push.
  Moments<Acc> Slot() {
    const size_t k = parts_.size();
    return Moments<Acc>{0, storage_.data() + 2 * k * width_, storage_.data() + (2 * k + 1) * width_};
  }
  void Push(const Moments<Acc>& m) {
    parts_.push_back(m);
    ++pushed_;
    for (int64_t count = pushed_; count % 2 == 0 && parts_.size() >= 2; count /= 2) MergeTop();
  }
  // Merges what is left, latest into earlier; the result is in the first slot.
  Moments<Acc> Finish() {
    while (parts_.size() > 1) MergeTop();
    return parts_.front();
  }

 private:
  void MergeTop() {
    Moments<Acc> b = parts_.back();
    parts_.pop_back();
    Merge(parts_.back(), b, width_);
  }
  int64_t width_;
  int64_t pushed_ = 0;
  std::vector<Acc> storage_;
  std::vector<Moments<Acc>> parts_;
};

// Statistics of rows [r0, r1) of units [u0, u0 + width) of x ([rows, cols]), written into out.
template <typename T>
void BlockMoments(const T* x, int64_t cols, int64_t u0, int64_t width, int64_t r0, int64_t r1,
                  typename Elem<T>::Acc* out_mean, typename Elem<T>::Acc* out_m2, int64_t* out_n) {
  using Acc = typename Elem<T>::Acc;
  const int64_t chunks = (r1 - r0 + kChunkRows - 1) / kChunkRows;
  PairwiseMerger<Acc> merger(width, chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t rb = r0 + c * kChunkRows;
    const int64_t re = std::min(r1, rb + kChunkRows);
    Moments<Acc> m = merger.Slot();
    Acc* __restrict__ mean = m.mean;
    Acc* __restrict__ m2 = m.m2;
    for (int64_t j = 0; j < width; ++j) mean[j] = Acc(0);
    for (int64_t r = rb; r < re; ++r) {
      const T* __restrict__ row = x + r * cols + u0;
      for (int64_t j = 0; j < width; ++j) mean[j] += Elem<T>::Load(row + j);
    }
    const Acc inv_n = Acc(1) / static_cast<Acc>(re - rb);
    for (int64_t j = 0; j < width; ++j) {
      mean[j] *= inv_n;
      m2[j] = Acc(0);
    }
    for (int64_t r = rb; r < re; ++r) {
      const T* __restrict__ row = x + r * cols + u0;
      for (int64_t j = 0; j < width; ++j) {
        const Acc d = Elem<T>::Load(row + j) - mean[j];
        m2[j] += d * d;
      }
    }
    m.n = re - rb;
    merger.Push(m);
  }
  const Moments<Acc> total = merger.Finish();
  std::memcpy(out_mean, total.mean, sizeof(Acc) * width);
  std::memcpy(out_m2, total.m2, sizeof(Acc) * width);
  *out_n = total.n;
}

// Turns M2 into the variance in place and returns the block's sum of unit entropies.
template <typename Acc>
double FinishBlock(Acc* variance_inout, int64_t width, int64_t n, int64_t ddof) {
  const Acc inv_dof = Acc(1) / static_cast<Acc>(n - ddof);
  const Acc pie = static_cast<Acc>(kPiE);
  double sum = 0.0;
  for (int64_t j = 0; j < width; ++j) {
    const Acc v = variance_inout[j] * inv_dof;
    variance_inout[j] = v;
    sum += static_cast<double>(Acc(0.5) * std::log1p(pie * v));
  }
  return sum;
}

template <typename T>
void ForwardTyped(const ForwardArgs& args, const ParallelFor& parallel_for) {
  using Acc = typename Elem<T>::Acc;
  const Plan plan = MakePlan(args.num_tensors, args.batch, args.units);
  std::vector<Acc> partial_mean(plan.partial_elements), partial_m2(plan.partial_elements);
  std::vector<int64_t> partial_n(plan.items.size());
  std::vector<double> block_entropy(plan.blocks.size());

  parallel_for(static_cast<int64_t>(plan.items.size()), kTargetItemElements,
               [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const WorkItem& item = plan.items[i];
      const T* x = static_cast<const T*>(args.x[item.tensor]);
      const int64_t width = item.unit_end - item.unit_begin;
      if (item.num_segments == 1) {
        Acc* mean = static_cast<Acc*>(args.mean[item.tensor]) + item.unit_begin;
        Acc* var = static_cast<Acc*>(args.variance[item.tensor]) + item.unit_begin;
        int64_t n = 0;
        BlockMoments<T>(x, args.units[item.tensor], item.unit_begin, width, item.row_begin,
                        item.row_end, mean, var, &n);
        block_entropy[item.block] = FinishBlock<Acc>(var, width, n, args.ddof);
      } else {
        BlockMoments<T>(x, args.units[item.tensor], item.unit_begin, width, item.row_begin,
                        item.row_end, partial_mean.data() + item.partial_offset,
                        partial_m2.data() + item.partial_offset, &partial_n[i]);
      }
    }
  });

  if (plan.multi_segment_blocks > 0) {
    parallel_for(static_cast<int64_t>(plan.blocks.size()), kTargetItemElements / 64,
                 [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const BlockInfo& info = plan.blocks[b];
        if (info.num_segments == 1) continue;
        const int64_t width = info.unit_end - info.unit_begin;
        PairwiseMerger<Acc> merger(width, info.num_segments);
        for (int64_t s = 0; s < info.num_segments; ++s) {
          const int64_t i = info.first_item + s;
          Moments<Acc> m = merger.Slot();
          std::memcpy(m.mean, partial_mean.data() + plan.items[i].partial_offset, sizeof(Acc) * width);
          std::memcpy(m.m2, partial_m2.data() + plan.items[i].partial_offset, sizeof(Acc) * width);
          m.n = partial_n[i];
          merger.Push(m);
        }
        const Moments<Acc> total = merger.Finish();
        Acc* mean = static_cast<Acc*>(args.mean[info.tensor]) + info.unit_begin;
        Acc* var = static_cast<Acc*>(args.variance[info.tensor]) + info.unit_begin;
        std::memcpy(mean, total.mean, sizeof(Acc) * width);
        std::memcpy(var, total.m2, sizeof(Acc) * width);
        block_entropy[b] = FinishBlock<Acc>(var, width, total.n, args.ddof);
      }
    });
  }

  T* entropy = static_cast<T*>(args.entropy);
  for (int64_t t = 0; t < args.num_tensors; ++t) {
    double sum = 0.0;
    for (int64_t b = plan.first_block_of_tensor[t]; b < plan.first_block_of_tensor[t + 1]; ++b)
      sum += block_entropy[b];
    Elem<T>::Store(entropy + t, static_cast<Acc>(sum / static_cast<double>(args.units[t])));
  }
}

template <typename T>
void BackwardTyped(const BackwardArgs& args, const ParallelFor& parallel_for) {
  using Acc = typename Elem<T>::Acc;
  const Plan plan = MakePlan(args.num_tensors, args.batch, args.units);
  const T* grad_entropy = static_cast<const T*>(args.grad_entropy);

  parallel_for(static_cast<int64_t>(plan.items.size()), 2 * kTargetItemElements,
               [&](int64_t begin, int64_t end) {
    Acc scale[kBlockUnits], shift[kBlockUnits];
    for (int64_t i = begin; i < end; ++i) {
      const WorkItem& item = plan.items[i];
      const int64_t t = item.tensor, u0 = item.unit_begin, cols = args.units[t];
      const int64_t width = item.unit_end - u0;
      const int64_t rows = args.batch[t];
      const Acc* mean = static_cast<const Acc*>(args.mean[t]) + u0;
      const Acc* var = static_cast<const Acc*>(args.variance[t]) + u0;
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
      const Acc pie = static_cast<Acc>(kPiE);
      for (int64_t j = 0; j < width; ++j) {
        Acc s = g * entropy_factor / (pie * var[j] + Acc(1));
        if (grad_var) s += grad_var[j] * var_factor;
        scale[j] = s;
        shift[j] = grad_mean ? grad_mean[j] * mean_factor : Acc(0);
      }
      const T* x = static_cast<const T*>(args.x[t]);
      T* dx = static_cast<T*>(args.dx[t]);
      for (int64_t r = item.row_begin; r < item.row_end; ++r) {
        const T* __restrict__ xr = x + r * cols + u0;
        T* __restrict__ dr = dx + r * cols + u0;
        for (int64_t j = 0; j < width; ++j)
          Elem<T>::Store(dr + j, (Elem<T>::Load(xr + j) - mean[j]) * scale[j] + shift[j]);
      }
    }
  });
}

inline void Forward(const ForwardArgs& args, const ParallelFor& parallel_for) {
  switch (args.dtype) {
    case DType::kFloat16: return ForwardTyped<Half>(args, parallel_for);
    case DType::kBFloat16: return ForwardTyped<BFloat16>(args, parallel_for);
    case DType::kFloat32: return ForwardTyped<float>(args, parallel_for);
    case DType::kFloat64: return ForwardTyped<double>(args, parallel_for);
  }
}

inline void Backward(const BackwardArgs& args, const ParallelFor& parallel_for) {
  switch (args.dtype) {
    case DType::kFloat16: return BackwardTyped<Half>(args, parallel_for);
    case DType::kBFloat16: return BackwardTyped<BFloat16>(args, parallel_for);
    case DType::kFloat32: return BackwardTyped<float>(args, parallel_for);
    case DType::kFloat64: return BackwardTyped<double>(args, parallel_for);
  }
}

}  // namespace LBE_CPU_ISA
}  // namespace cpu
}  // namespace lbe
