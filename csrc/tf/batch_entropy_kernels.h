// OpKernels of the Lbe>* ops, shared by CPU and GPU. Thin: validate the inputs (errors name the
// argument), allocate the outputs, fill the core's descriptors and hand them to
// Launcher<Device>, which each device file (batch_entropy_kernels.cc for the CPU,
// batch_entropy_kernels_gpu.cc for CUDA) specializes.
#ifndef LBE_OPS_TF_BATCH_ENTROPY_KERNELS_H_
#define LBE_OPS_TF_BATCH_ENTROPY_KERNELS_H_

#include <string>
#include <type_traits>
#include <vector>

#include "batch_entropy_common.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/util/overflow.h"

namespace lbe_tf {

struct CpuDevice {};
struct GpuDevice {};

// Each device specializes this: enqueue (or run) the core on that device. Zero and Copy work on
// the op's device memory, in the order of the op's other work there (on the GPU, its stream);
// with allow_small_batch they fill the outputs of tensors the core does not see.
template <typename Device>
struct Launcher {
  static absl::Status Forward(tensorflow::OpKernelContext* ctx, const lbe::ForwardArgs& args);
  static absl::Status Backward(tensorflow::OpKernelContext* ctx, const lbe::BackwardArgs& args);
  static absl::Status Zero(tensorflow::OpKernelContext* ctx, void* ptr, size_t bytes);
  static absl::Status Copy(tensorflow::OpKernelContext* ctx, void* dst, const void* src,
                           size_t bytes);
};

template <typename T> struct CoreDType;
template <> struct CoreDType<Eigen::half> { static constexpr lbe::DType value = lbe::DType::kFloat16; };
template <> struct CoreDType<Eigen::bfloat16> { static constexpr lbe::DType value = lbe::DType::kBFloat16; };
template <> struct CoreDType<float> { static constexpr lbe::DType value = lbe::DType::kFloat32; };
template <> struct CoreDType<double> { static constexpr lbe::DType value = lbe::DType::kFloat64; };

// The name of one argument in error messages: "x", or "xs[3]" in a grouped op. Spelled out only when
// an error is reported (building the strings for every tensor of a 500-tensor group, on every
// call, was a measurable part of the grouped ops' time).
struct ArgName {
  const char* base;
  int index;  // -1: not a list element
  std::string str() const {
    return index < 0 ? std::string(base) : std::string(base) + "[" + std::to_string(index) + "]";
  }
};

// Checks one activation tensor and returns its [batch, units] view. A batch <= ddof has no
// variance: an error, unless allow_small_batch, which marks the tensor *small instead.
inline absl::Status CheckActivation(const tensorflow::Tensor& x, const ArgName& name,
                                    int64_t ddof, bool allow_small_batch, int64_t* batch,
                                    int64_t* units, bool* small) {
  if (x.dims() < 2) {
    return tensorflow::errors::InvalidArgument(
        name.str(), " must have rank >= 2 ([batch, units...]), got shape ", x.shape().DebugString());
  }
  *batch = x.dim_size(0);
  *small = *batch <= ddof;
  if (*small && !allow_small_batch) {
    return tensorflow::errors::InvalidArgument(
        name.str(), " has a batch of ", *batch, ", but batch entropy with ddof=", ddof,
        " needs a batch of at least ", ddof + 1, " (shape ", x.shape().DebugString(), ")");
  }
  // Not NumElements() / batch: the batch may be 0, and then the other dimensions' product is not
  // bounded by NumElements().
  *units = 1;
  for (int d = 1; d < x.dims(); ++d) {
    *units = tensorflow::MultiplyWithoutOverflow(*units, x.dim_size(d));
  }
  if (*units < 0) {
    return tensorflow::errors::InvalidArgument(
        name.str(), " has more units than int64 holds (shape ", x.shape().DebugString(), ")");
  }
  if (*units == 0) {
    return tensorflow::errors::InvalidArgument(name.str(), " has zero units (shape ",
                                               x.shape().DebugString(), ")");
  }
  return absl::OkStatus();
}

inline absl::Status CheckStats(const tensorflow::Tensor& t, const char* name, int64_t units) {
  if (t.dims() != 1 || t.dim_size(0) != units) {
    return tensorflow::errors::InvalidArgument(name, " must have shape [", units, "], got ",
                                               t.shape().DebugString());
  }
  return absl::OkStatus();
}

// A gradient for a statistic: [units], or [0] when none reached it (then *data is null).
inline absl::Status CheckOptionalStats(const tensorflow::Tensor& t, const char* name,
                                       int64_t units, const void** data) {
  if (t.dims() == 1 && t.dim_size(0) == 0) {
    *data = nullptr;
    return absl::OkStatus();
  }
  if (t.dims() != 1 || t.dim_size(0) != units) {
    return tensorflow::errors::InvalidArgument(name, " must have shape [", units,
                                               "] (or [0] for no gradient), got ",
                                               t.shape().DebugString());
  }
  *data = t.data();
  return absl::OkStatus();
}

// The activations of one op: the single op's x, or the grouped op's xs, checked, with their
// [batch, units] views. The statistics of all of them lie one after another in flat vectors of
// total_units (for the single op that is just x's [U]). small[i]: batch <= ddof, let through by
// allow_small_batch.
struct Activations {
  tensorflow::OpInputList list;
  std::vector<const void*> data;
  std::vector<int64_t> batch, units;
  std::vector<bool> small;
  int num_small = 0;
  int64_t total_units = 0;
  int size() const { return list.size(); }
};

template <bool kGrouped>
absl::Status GetActivations(tensorflow::OpKernelContext* ctx, int64_t ddof,
                            bool allow_small_batch, Activations* a) {
  const char* name = kGrouped ? "xs" : "x";
  TF_RETURN_IF_ERROR(ctx->input_list(name, &a->list));
  const int n = a->list.size();
  a->data.resize(n);
  a->batch.resize(n);
  a->units.resize(n);
  a->small.resize(n);
  for (int i = 0; i < n; ++i) {
    bool small = false;
    TF_RETURN_IF_ERROR(CheckActivation(a->list[i], ArgName{name, kGrouped ? i : -1}, ddof,
                                       allow_small_batch, &a->batch[i], &a->units[i], &small));
    a->small[i] = small;
    a->num_small += small;
    a->data[i] = a->list[i].data();
    a->total_units += a->units[i];
  }
  return absl::OkStatus();
}

// Maximal runs [begin, end) of consecutive tensors that are all small or all not, in order: the
// statistics and entropies of a run lie together, so each run takes one Zero or one Copy.
struct Run {
  int begin, end;
  bool small;
};

inline std::vector<Run> SmallRuns(const Activations& a) {
  std::vector<Run> runs;
  for (int i = 0; i < a.size(); ++i) {
    if (runs.empty() || runs.back().small != a.small[i]) runs.push_back({i, i, a.small[i]});
    runs.back().end = i + 1;
  }
  return runs;
}

// The entries of a per-tensor descriptor array for the tensors the core is called with.
template <typename E>
std::vector<std::remove_cv_t<E>> Select(E* all, const std::vector<int>& kept) {
  std::vector<std::remove_cv_t<E>> out;
  out.reserve(kept.size());
  for (int i : kept) out.push_back(all[i]);
  return out;
}

inline std::vector<int> KeptTensors(const Activations& a) {
  std::vector<int> kept;
  for (int i = 0; i < a.size(); ++i) {
    if (!a.small[i]) kept.push_back(i);
  }
  return kept;
}

// base + bytes, for void* and const void* alike.
template <typename Pointer>
Pointer Advance(Pointer base, int64_t bytes) {
  using Byte = std::conditional_t<std::is_const_v<std::remove_pointer_t<Pointer>>, const char, char>;
  return static_cast<Byte*>(base) + bytes;
}

// The forward of a group with small tensors: their entropies and statistics are zero-filled, and
// the core sees only the others. Its entropies come out packed (the core writes entropy[k] for
// its k-th tensor) and are copied into place, one copy per run.
template <typename Device, typename T, typename TStats>
absl::Status ForwardSkippingSmall(tensorflow::OpKernelContext* ctx, const Activations& xs,
                                  const lbe::ForwardArgs& all) {
  const std::vector<Run> runs = SmallRuns(xs);
  for (const Run& run : runs) {
    if (!run.small) continue;
    int64_t units = 0;
    for (int i = run.begin; i < run.end; ++i) units += xs.units[i];
    TF_RETURN_IF_ERROR(Launcher<Device>::Zero(ctx, all.mean[run.begin], units * sizeof(TStats)));
    TF_RETURN_IF_ERROR(
        Launcher<Device>::Zero(ctx, all.variance[run.begin], units * sizeof(TStats)));
    TF_RETURN_IF_ERROR(Launcher<Device>::Zero(ctx, Advance(all.entropy, run.begin * sizeof(T)),
                                              (run.end - run.begin) * sizeof(T)));
  }
  const std::vector<int> kept = KeptTensors(xs);
  if (kept.empty()) return absl::OkStatus();
  const auto x = Select(all.x, kept);
  const auto batch = Select(all.batch, kept);
  const auto units = Select(all.units, kept);
  const auto mean = Select(all.mean, kept);
  const auto variance = Select(all.variance, kept);
  tensorflow::Tensor packed_entropy;
  const tensorflow::TensorShape packed_shape({static_cast<int64_t>(kept.size())});
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::value, packed_shape, &packed_entropy));
  lbe::ForwardArgs args = all;
  args.num_tensors = static_cast<int64_t>(kept.size());
  args.x = x.data();
  args.batch = batch.data();
  args.units = units.data();
  args.mean = mean.data();
  args.variance = variance.data();
  args.entropy = packed_entropy.data();
  TF_RETURN_IF_ERROR(Launcher<Device>::Forward(ctx, args));
  int64_t packed = 0;
  for (const Run& run : runs) {
    if (run.small) continue;
    TF_RETURN_IF_ERROR(Launcher<Device>::Copy(
        ctx, Advance(all.entropy, run.begin * sizeof(T)),
        Advance(static_cast<const void*>(packed_entropy.data()), packed * sizeof(T)),
        (run.end - run.begin) * sizeof(T)));
    packed += run.end - run.begin;
  }
  return absl::OkStatus();
}

// The gradient of a group with small tensors: their dx is zero-filled (they are constants), and
// the core sees only the others, with their grad_entropies packed (one copy per run).
template <typename Device, typename T>
absl::Status BackwardSkippingSmall(tensorflow::OpKernelContext* ctx, const Activations& xs,
                                   const lbe::BackwardArgs& all) {
  const std::vector<Run> runs = SmallRuns(xs);
  for (int i = 0; i < xs.size(); ++i) {
    const int64_t bytes = xs.batch[i] * xs.units[i] * static_cast<int64_t>(sizeof(T));
    if (xs.small[i] && bytes > 0) TF_RETURN_IF_ERROR(Launcher<Device>::Zero(ctx, all.dx[i], bytes));
  }
  const std::vector<int> kept = KeptTensors(xs);
  if (kept.empty()) return absl::OkStatus();
  tensorflow::Tensor packed_grad_entropy;
  const tensorflow::TensorShape packed_shape({static_cast<int64_t>(kept.size())});
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::value, packed_shape,
                                        &packed_grad_entropy));
  int64_t packed = 0;
  for (const Run& run : runs) {
    if (run.small) continue;
    TF_RETURN_IF_ERROR(Launcher<Device>::Copy(
        ctx, Advance(packed_grad_entropy.data(), packed * sizeof(T)),
        Advance(all.grad_entropy, run.begin * sizeof(T)), (run.end - run.begin) * sizeof(T)));
    packed += run.end - run.begin;
  }
  const auto x = Select(all.x, kept);
  const auto batch = Select(all.batch, kept);
  const auto units = Select(all.units, kept);
  const auto mean = Select(all.mean, kept);
  const auto variance = Select(all.variance, kept);
  const auto grad_mean = Select(all.grad_mean, kept);
  const auto grad_variance = Select(all.grad_variance, kept);
  const auto dx = Select(all.dx, kept);
  lbe::BackwardArgs args = all;
  args.num_tensors = static_cast<int64_t>(kept.size());
  args.x = x.data();
  args.batch = batch.data();
  args.units = units.data();
  args.mean = mean.data();
  args.variance = variance.data();
  args.grad_entropy = packed_grad_entropy.data();
  args.grad_mean = grad_mean.data();
  args.grad_variance = grad_variance.data();
  args.dx = dx.data();
  return Launcher<Device>::Backward(ctx, args);
}

// Per-tensor pointers into a flat statistics vector (null entries where base is null: no
// gradient). Pointer is void* for outputs, const void* for inputs.
template <typename Pointer>
std::vector<Pointer> SplitStats(Pointer base, const Activations& a, int64_t stats_size) {
  std::vector<Pointer> out(a.size(), nullptr);
  if (base == nullptr) return out;
  int64_t offset = 0;
  for (int i = 0; i < a.size(); ++i) {
    out[i] = Advance(base, offset * stats_size);
    offset += a.units[i];
  }
  return out;
}

template <typename Device, typename T, typename TStats, bool kGrouped>
class BatchEntropyOp : public tensorflow::OpKernel {
 public:
  explicit BatchEntropyOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("ddof", &ddof_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("allow_small_batch", &allow_small_batch_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    Activations xs;
    OP_REQUIRES_OK(ctx, GetActivations<kGrouped>(ctx, ddof_, allow_small_batch_, &xs));
    const int n = xs.size();
    tensorflow::Tensor *entropy = nullptr, *mean = nullptr, *variance = nullptr;
    const tensorflow::TensorShape entropy_shape =
        kGrouped ? tensorflow::TensorShape({n}) : tensorflow::TensorShape({});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, entropy_shape, &entropy));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, {xs.total_units}, &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, {xs.total_units}, &variance));
    const std::vector<void*> mean_ptrs = SplitStats<void*>(mean->data(), xs, sizeof(TStats));
    const std::vector<void*> var_ptrs = SplitStats<void*>(variance->data(), xs, sizeof(TStats));
    lbe::ForwardArgs args;
    args.dtype = CoreDType<T>::value;
    args.ddof = ddof_;
    args.num_tensors = n;
    args.x = xs.data.data();
    args.batch = xs.batch.data();
    args.units = xs.units.data();
    args.mean = mean_ptrs.data();
    args.variance = var_ptrs.data();
    args.entropy = entropy->data();
    if (xs.num_small > 0) {
      OP_REQUIRES_OK(ctx, (ForwardSkippingSmall<Device, T, TStats>(ctx, xs, args)));
    } else {
      OP_REQUIRES_OK(ctx, Launcher<Device>::Forward(ctx, args));
    }
  }

 private:
  int64_t ddof_;
  bool allow_small_batch_;
};

template <typename Device, typename T, typename TStats, bool kGrouped>
class BatchEntropyGradOp : public tensorflow::OpKernel {
 public:
  explicit BatchEntropyGradOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("ddof", &ddof_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("allow_small_batch", &allow_small_batch_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    Activations xs;
    OP_REQUIRES_OK(ctx, GetActivations<kGrouped>(ctx, ddof_, allow_small_batch_, &xs));
    const int n = xs.size();
    const char* const mean_name = kGrouped ? "means" : "mean";
    const char* const variance_name = kGrouped ? "variances" : "variance";
    const char* const grad_entropy_name = kGrouped ? "grad_entropies" : "grad_entropy";
    const char* const grad_mean_name = kGrouped ? "grad_means" : "grad_mean";
    const char* const grad_variance_name = kGrouped ? "grad_variances" : "grad_variance";
    const tensorflow::Tensor *mean, *variance, *grad_entropy, *grad_mean, *grad_variance;
    OP_REQUIRES_OK(ctx, ctx->input(mean_name, &mean));
    OP_REQUIRES_OK(ctx, ctx->input(variance_name, &variance));
    OP_REQUIRES_OK(ctx, ctx->input(grad_entropy_name, &grad_entropy));
    OP_REQUIRES_OK(ctx, ctx->input(grad_mean_name, &grad_mean));
    OP_REQUIRES_OK(ctx, ctx->input(grad_variance_name, &grad_variance));
    if (kGrouped) {
      OP_REQUIRES(ctx, grad_entropy->dims() == 1 && grad_entropy->dim_size(0) == n,
                  tensorflow::errors::InvalidArgument("grad_entropies must have shape [", n,
                                                      "], got ", grad_entropy->shape().DebugString()));
    } else {
      OP_REQUIRES(ctx, grad_entropy->dims() == 0,
                  tensorflow::errors::InvalidArgument("grad_entropy must be a scalar, got shape ",
                                                      grad_entropy->shape().DebugString()));
    }
    OP_REQUIRES_OK(ctx, CheckStats(*mean, mean_name, xs.total_units));
    OP_REQUIRES_OK(ctx, CheckStats(*variance, variance_name, xs.total_units));
    const void *grad_mean_data = nullptr, *grad_variance_data = nullptr;
    OP_REQUIRES_OK(ctx, CheckOptionalStats(*grad_mean, grad_mean_name, xs.total_units, &grad_mean_data));
    OP_REQUIRES_OK(ctx, CheckOptionalStats(*grad_variance, grad_variance_name, xs.total_units,
                                           &grad_variance_data));
    std::vector<void*> dx_ptrs(n);
    OP_REQUIRES_OK(ctx, AllocateGradients(ctx, xs, &dx_ptrs));
    const std::vector<const void*> mean_ptrs =
        SplitStats<const void*>(mean->data(), xs, sizeof(TStats));
    const std::vector<const void*> var_ptrs =
        SplitStats<const void*>(variance->data(), xs, sizeof(TStats));
    const std::vector<const void*> gmean_ptrs =
        SplitStats<const void*>(grad_mean_data, xs, sizeof(TStats));
    const std::vector<const void*> gvar_ptrs =
        SplitStats<const void*>(grad_variance_data, xs, sizeof(TStats));
    lbe::BackwardArgs args;
    args.dtype = CoreDType<T>::value;
    args.ddof = ddof_;
    args.num_tensors = n;
    args.x = xs.data.data();
    args.batch = xs.batch.data();
    args.units = xs.units.data();
    args.mean = mean_ptrs.data();
    args.variance = var_ptrs.data();
    args.grad_entropy = grad_entropy->data();
    args.grad_mean = gmean_ptrs.data();
    args.grad_variance = gvar_ptrs.data();
    args.dx = dx_ptrs.data();
    if (xs.num_small > 0) {
      OP_REQUIRES_OK(ctx, (BackwardSkippingSmall<Device, T>(ctx, xs, args)));
    } else {
      OP_REQUIRES_OK(ctx, Launcher<Device>::Backward(ctx, args));
    }
  }

 private:
  // One dx per input. A group's dx tensors are slices of one buffer: one allocation (and one
  // free) per call instead of one per tensor, which for a group of hundreds of small layers
  // was a visible part of the op's time. Each slice starts on a boundary of TensorFlow's
  // allocator alignment, as its own allocation would, so every consumer may use aligned loads.
  static absl::Status AllocateGradients(tensorflow::OpKernelContext* ctx, const Activations& xs,
                                        std::vector<void*>* dx_ptrs) {
    const int n = xs.size();
    if (n == 1) {
      tensorflow::Tensor* dx = nullptr;
      TF_RETURN_IF_ERROR(ctx->allocate_output(0, xs.list[0].shape(), &dx));
      (*dx_ptrs)[0] = dx->data();
      return absl::OkStatus();
    }
    constexpr int64_t kStep = tensorflow::Allocator::kAllocatorAlignment / sizeof(T);
    auto padded = [&](int i) { return (xs.list[i].NumElements() + kStep - 1) / kStep * kStep; };
    int64_t total = 0;
    for (int i = 0; i < n; ++i) total += padded(i);
    tensorflow::Tensor buffer;
    TF_RETURN_IF_ERROR(
        ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::value, tensorflow::TensorShape({total}),
                           &buffer));
    int64_t offset = 0;
    for (int i = 0; i < n; ++i) {
      const tensorflow::Tensor& x = xs.list[i];
      tensorflow::Tensor dx;
      if (!dx.CopyFrom(buffer.Slice(offset, offset + x.NumElements()), x.shape())) {
        return tensorflow::errors::Internal("BatchEntropiesGrad: cannot view the gradient buffer "
                                            "as shape ", x.shape().DebugString());
      }
      (*dx_ptrs)[i] = dx.data();
      ctx->set_output(i, std::move(dx));
      offset += padded(i);
    }
    return absl::OkStatus();
  }

  int64_t ddof_;
  bool allow_small_batch_;
};

}  // namespace lbe_tf

// Registers the four ops for one device and one (T, Tstats) pair.
#define LBE_REGISTER_KERNELS_FOR_TYPE(DEVICE, DeviceTag, T, TStats)                            \
  REGISTER_KERNEL_BUILDER(Name("Lbe>BatchEntropy")                                           \
                              .Device(DEVICE)                                                \
                              .TypeConstraint<T>("T")                                        \
                              .TypeConstraint<TStats>("Tstats"),                             \
                          ::lbe_tf::BatchEntropyOp<DeviceTag, T, TStats, false>);            \
  REGISTER_KERNEL_BUILDER(Name("Lbe>BatchEntropies")                                         \
                              .Device(DEVICE)                                                \
                              .TypeConstraint<T>("T")                                        \
                              .TypeConstraint<TStats>("Tstats"),                             \
                          ::lbe_tf::BatchEntropyOp<DeviceTag, T, TStats, true>);             \
  REGISTER_KERNEL_BUILDER(Name("Lbe>BatchEntropyGrad")                                       \
                              .Device(DEVICE)                                                \
                              .TypeConstraint<T>("T")                                        \
                              .TypeConstraint<TStats>("Tstats"),                             \
                          ::lbe_tf::BatchEntropyGradOp<DeviceTag, T, TStats, false>);        \
  REGISTER_KERNEL_BUILDER(Name("Lbe>BatchEntropiesGrad")                                     \
                              .Device(DEVICE)                                                \
                              .TypeConstraint<T>("T")                                        \
                              .TypeConstraint<TStats>("Tstats"),                             \
                          ::lbe_tf::BatchEntropyGradOp<DeviceTag, T, TStats, true>)

// All four dtypes with their statistics types.
#define LBE_REGISTER_ALL_KERNELS(DEVICE, DeviceTag)                           \
  LBE_REGISTER_KERNELS_FOR_TYPE(DEVICE, DeviceTag, Eigen::half, float);       \
  LBE_REGISTER_KERNELS_FOR_TYPE(DEVICE, DeviceTag, Eigen::bfloat16, float);   \
  LBE_REGISTER_KERNELS_FOR_TYPE(DEVICE, DeviceTag, float, float);             \
  LBE_REGISTER_KERNELS_FOR_TYPE(DEVICE, DeviceTag, double, double)

#endif  // LBE_OPS_TF_BATCH_ENTROPY_KERNELS_H_
