// OpKernels of the Lbe>* ops, shared by CPU and GPU. Thin: validate the inputs (errors name the
// argument), allocate the outputs, fill the core's descriptors and hand them to
// Launcher<Device>, which each device file (batch_entropy_kernels.cc for the CPU,
// batch_entropy_kernels_gpu.cc for CUDA) specializes.
#ifndef LBE_OPS_TF_BATCH_ENTROPY_KERNELS_H_
#define LBE_OPS_TF_BATCH_ENTROPY_KERNELS_H_

#include <string>
#include <type_traits>
#include <vector>

#include "batch_entropy_binding.h"
#include "batch_entropy_common.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"

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

// TensorFlow's element types for the core's dtypes.
using TfElementTypes = lbe::ElementTypes<Eigen::half, Eigen::bfloat16, float, double>;

// The binding's view of a tensor's shape for lbe::AddActivation.
struct TfShape {
  static int64_t Rank(const tensorflow::Tensor& t) { return t.dims(); }
  static int64_t Dim(const tensorflow::Tensor& t, int64_t d) { return t.dim_size(d); }
  static std::string String(const tensorflow::Tensor& t) { return t.shape().DebugString(); }
};

inline absl::Status ToStatus(const std::string& error) {
  if (error.empty()) return absl::OkStatus();
  return tensorflow::errors::InvalidArgument(error);
}

inline absl::Status CheckStats(const tensorflow::Tensor& t, const char* name, int64_t units) {
  if (t.dims() != 1 || t.dim_size(0) != units) {
    return tensorflow::errors::InvalidArgument(name, " must have shape [", units, "], got ",
                                               t.shape().DebugString());
  }
  return absl::OkStatus();
}

// An optional statistics input (a gradient for a statistic, a mean residual): [units], or [0] for
// none (then *data is null).
inline absl::Status CheckOptionalStats(const tensorflow::Tensor& t, const char* name,
                                       int64_t units, const void** data) {
  if (t.dims() == 1 && t.dim_size(0) == 0) {
    *data = nullptr;
    return absl::OkStatus();
  }
  if (t.dims() != 1 || t.dim_size(0) != units) {
    return tensorflow::errors::InvalidArgument(name, " must have shape [", units,
                                               "] (or [0] for none), got ",
                                               t.shape().DebugString());
  }
  *data = t.data();
  return absl::OkStatus();
}

// Maximal runs [begin, end) of consecutive tensors that are all small or all not, in order: the
// statistics and entropies of a run lie together, so each run takes one Zero or one Copy.
struct Run {
  int begin, end;
  bool small;
};

inline std::vector<Run> SmallRuns(const lbe::Activations& a) {
  std::vector<Run> runs;
  for (int i = 0; i < a.size(); ++i) {
    if (runs.empty() || runs.back().small != a.small[i]) runs.push_back({i, i, a.small[i]});
    runs.back().end = i + 1;
  }
  return runs;
}

inline std::vector<int> KeptTensors(const lbe::Activations& a) {
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

template <typename Device>
absl::Status Launch(tensorflow::OpKernelContext* ctx, const lbe::ForwardCall& call) {
  return Launcher<Device>::Forward(ctx, call.Args());
}

template <typename Device>
absl::Status Launch(tensorflow::OpKernelContext* ctx, const lbe::BackwardCall& call) {
  return Launcher<Device>::Backward(ctx, call.Args());
}

// Zero-fills what the small tensors of a call get: entropies and statistics in the forward, dx
// in the gradient (small tensors are constants).
template <typename Device>
absl::Status ZeroSmall(tensorflow::OpKernelContext* ctx, const lbe::ForwardCall& call,
                       const std::vector<Run>& runs) {
  const int64_t item = lbe::DTypeSize(call.in.dtype), stats_item = lbe::StatsSize(call.in.dtype);
  for (const Run& run : runs) {
    if (!run.small) continue;
    int64_t units = 0;
    for (int i = run.begin; i < run.end; ++i) units += call.in.units[i];
    TF_RETURN_IF_ERROR(Launcher<Device>::Zero(ctx, call.mean[run.begin], units * stats_item));
    TF_RETURN_IF_ERROR(Launcher<Device>::Zero(ctx, call.variance[run.begin], units * stats_item));
    if (!call.mean_residual.empty()) {
      TF_RETURN_IF_ERROR(Launcher<Device>::Zero(ctx, call.mean_residual[run.begin], units * stats_item));
    }
    TF_RETURN_IF_ERROR(Launcher<Device>::Zero(ctx, Advance(call.entropy, run.begin * item),
                                              (run.end - run.begin) * item));
  }
  return absl::OkStatus();
}

template <typename Device>
absl::Status ZeroSmall(tensorflow::OpKernelContext* ctx, const lbe::BackwardCall& call,
                       const std::vector<Run>&) {
  const int64_t item = lbe::DTypeSize(call.in.dtype);
  for (int i = 0; i < call.in.size(); ++i) {
    const int64_t bytes = call.in.batch[i] * call.in.units[i] * item;
    if (call.in.small[i] && bytes > 0) TF_RETURN_IF_ERROR(Launcher<Device>::Zero(ctx, call.dx[i], bytes));
  }
  return absl::OkStatus();
}

// Runs the core on a call, forward or gradient. With small tensors (allow_small_batch) their
// outputs are zero-filled and the core sees only the others, with the per-tensor entropies
// packed: the core reads grad_entropy[k] and writes entropy[k] for its k-th tensor, so the
// gradient's grad_entropies are copied into a packed buffer before it runs and the forward's
// entropies out of one after, one copy per run.
template <typename Device, typename Call>
absl::Status RunCall(tensorflow::OpKernelContext* ctx, const Call& all) {
  if (all.in.num_small == 0) return Launch<Device>(ctx, all);
  constexpr bool kForward = std::is_same_v<Call, lbe::ForwardCall>;
  const std::vector<Run> runs = SmallRuns(all.in);
  TF_RETURN_IF_ERROR(ZeroSmall<Device>(ctx, all, runs));
  const std::vector<int> kept = KeptTensors(all.in);
  if (kept.empty()) return absl::OkStatus();
  const int64_t item = lbe::DTypeSize(all.in.dtype);
  tensorflow::Tensor packed;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(
      tensorflow::DT_INT8, tensorflow::TensorShape({static_cast<int64_t>(kept.size()) * item}), &packed));
  // Copies each run of kept tensors' entropies between the call's vector and the packed one.
  auto copy_runs = [&]() -> absl::Status {
    int64_t k = 0;
    for (const Run& run : runs) {
      if (run.small) continue;
      const int64_t bytes = (run.end - run.begin) * item;
      void* packed_at = Advance(packed.data(), k * item);
      if constexpr (kForward) {
        TF_RETURN_IF_ERROR(Launcher<Device>::Copy(ctx, Advance(all.entropy, run.begin * item),
                                                  packed_at, bytes));
      } else {
        TF_RETURN_IF_ERROR(Launcher<Device>::Copy(
            ctx, packed_at, Advance(all.grad_entropy, run.begin * item), bytes));
      }
      k += run.end - run.begin;
    }
    return absl::OkStatus();
  };
  Call call = lbe::Select(all, kept);
  if constexpr (kForward) {
    call.entropy = packed.data();
    TF_RETURN_IF_ERROR(Launch<Device>(ctx, call));
    return copy_runs();
  } else {
    TF_RETURN_IF_ERROR(copy_runs());
    call.grad_entropy = packed.data();
    return Launch<Device>(ctx, call);
  }
}

// Per-tensor pointers into a flat statistics vector (null entries where base is null: no
// gradient). Pointer is void* for outputs, const void* for inputs.
template <typename Pointer>
std::vector<Pointer> SplitStats(Pointer base, const lbe::Activations& a) {
  std::vector<Pointer> out(a.size(), nullptr);
  if (base == nullptr) return out;
  const int64_t stats_size = lbe::StatsSize(a.dtype);
  int64_t offset = 0;
  for (int i = 0; i < a.size(); ++i) {
    out[i] = Advance(base, offset * stats_size);
    offset += a.units[i];
  }
  return out;
}

// The rest of the forward: allocate the outputs and point the call at them.
template <typename T, bool kGrouped>
absl::Status Prepare(tensorflow::OpKernelContext* ctx, const tensorflow::OpInputList& xs,
                     lbe::ForwardCall* call) {
  tensorflow::Tensor *entropy = nullptr, *mean = nullptr, *variance = nullptr, *residual = nullptr;
  const tensorflow::TensorShape entropy_shape =
      kGrouped ? tensorflow::TensorShape({xs.size()}) : tensorflow::TensorShape({});
  TF_RETURN_IF_ERROR(ctx->allocate_output(0, entropy_shape, &entropy));
  TF_RETURN_IF_ERROR(ctx->allocate_output(1, {call->in.total_units}, &mean));
  TF_RETURN_IF_ERROR(ctx->allocate_output(2, {call->in.total_units}, &variance));
  call->mean = SplitStats<void*>(mean->data(), call->in);
  call->variance = SplitStats<void*>(variance->data(), call->in);
  if (ctx->num_outputs() > 3) {  // num_residuals = 1
    TF_RETURN_IF_ERROR(ctx->allocate_output(3, {call->in.total_units}, &residual));
    call->mean_residual = SplitStats<void*>(residual->data(), call->in);
  }
  call->entropy = entropy->data();
  return absl::OkStatus();
}

// One dx per input. A group's dx tensors are slices of one buffer: one allocation (and one
// free) per call instead of one per tensor, which for a group of hundreds of small layers
// would be a visible part of the op's time. Each slice starts on a boundary of TensorFlow's
// allocator alignment, as its own allocation would, so every consumer may use aligned loads.
template <typename T>
absl::Status AllocateGradients(tensorflow::OpKernelContext* ctx, const tensorflow::OpInputList& xs,
                               std::vector<void*>* dx_ptrs) {
  const int n = xs.size();
  if (n == 1) {
    tensorflow::Tensor* dx = nullptr;
    TF_RETURN_IF_ERROR(ctx->allocate_output(0, xs[0].shape(), &dx));
    (*dx_ptrs)[0] = dx->data();
    return absl::OkStatus();
  }
  constexpr int64_t kStep = tensorflow::Allocator::kAllocatorAlignment / sizeof(T);
  auto padded = [&](int i) { return (xs[i].NumElements() + kStep - 1) / kStep * kStep; };
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += padded(i);
  tensorflow::Tensor buffer;
  TF_RETURN_IF_ERROR(
      ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::value, tensorflow::TensorShape({total}),
                         &buffer));
  int64_t offset = 0;
  for (int i = 0; i < n; ++i) {
    const tensorflow::Tensor& x = xs[i];
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

// The rest of the gradient: check the other inputs, allocate the outputs, fill the call.
template <typename T, bool kGrouped>
absl::Status Prepare(tensorflow::OpKernelContext* ctx, const tensorflow::OpInputList& xs,
                     lbe::BackwardCall* call) {
  const int n = xs.size();
  const char* const mean_name = kGrouped ? "means" : "mean";
  const char* const variance_name = kGrouped ? "variances" : "variance";
  const char* const grad_entropy_name = kGrouped ? "grad_entropies" : "grad_entropy";
  const char* const grad_mean_name = kGrouped ? "grad_means" : "grad_mean";
  const char* const grad_variance_name = kGrouped ? "grad_variances" : "grad_variance";
  const char* const residual_name = kGrouped ? "mean_residuals" : "mean_residual";
  const tensorflow::Tensor *mean, *variance, *grad_entropy, *grad_mean, *grad_variance;
  tensorflow::OpInputList residuals;  // num_residuals (0 or 1) tensors
  TF_RETURN_IF_ERROR(ctx->input(mean_name, &mean));
  TF_RETURN_IF_ERROR(ctx->input(variance_name, &variance));
  TF_RETURN_IF_ERROR(ctx->input(grad_entropy_name, &grad_entropy));
  TF_RETURN_IF_ERROR(ctx->input(grad_mean_name, &grad_mean));
  TF_RETURN_IF_ERROR(ctx->input(grad_variance_name, &grad_variance));
  TF_RETURN_IF_ERROR(ctx->input_list(residual_name, &residuals));
  if (kGrouped && !(grad_entropy->dims() == 1 && grad_entropy->dim_size(0) == n)) {
    return tensorflow::errors::InvalidArgument("grad_entropies must have shape [", n, "], got ",
                                               grad_entropy->shape().DebugString());
  }
  if (!kGrouped && grad_entropy->dims() != 0) {
    return tensorflow::errors::InvalidArgument("grad_entropy must be a scalar, got shape ",
                                               grad_entropy->shape().DebugString());
  }
  const int64_t total_units = call->in.total_units;
  TF_RETURN_IF_ERROR(CheckStats(*mean, mean_name, total_units));
  TF_RETURN_IF_ERROR(CheckStats(*variance, variance_name, total_units));
  const void *grad_mean_data = nullptr, *grad_variance_data = nullptr, *residual_data = nullptr;
  TF_RETURN_IF_ERROR(CheckOptionalStats(*grad_mean, grad_mean_name, total_units, &grad_mean_data));
  TF_RETURN_IF_ERROR(CheckOptionalStats(*grad_variance, grad_variance_name, total_units,
                                        &grad_variance_data));
  if (residuals.size() > 0) {
    TF_RETURN_IF_ERROR(CheckOptionalStats(residuals[0], residual_name, total_units, &residual_data));
  }
  call->dx.resize(n);
  TF_RETURN_IF_ERROR(AllocateGradients<T>(ctx, xs, &call->dx));
  call->mean = SplitStats<const void*>(mean->data(), call->in);
  call->variance = SplitStats<const void*>(variance->data(), call->in);
  call->grad_mean = SplitStats<const void*>(grad_mean_data, call->in);
  call->grad_variance = SplitStats<const void*>(grad_variance_data, call->in);
  call->mean_residual = SplitStats<const void*>(residual_data, call->in);
  call->grad_entropy = grad_entropy->data();
  return absl::OkStatus();
}

// The OpKernel of all four ops: Call is lbe::ForwardCall for Lbe>BatchEntropy(ies) and
// lbe::BackwardCall for their gradients. It reads the activations, lets Prepare do the rest of
// the inputs and the outputs, and runs the core.
template <typename Device, typename T, bool kGrouped, typename Call>
class BatchEntropyKernel : public tensorflow::OpKernel {
 public:
  explicit BatchEntropyKernel(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("ddof", &ddof_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("allow_small_batch", &allow_small_batch_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    Call call;
    tensorflow::OpInputList xs;
    OP_REQUIRES_OK(ctx, ReadActivations(ctx, &xs, &call.in));
    OP_REQUIRES_OK(ctx, (Prepare<T, kGrouped>(ctx, xs, &call)));
    OP_REQUIRES_OK(ctx, RunCall<Device>(ctx, call));
  }

 private:
  // The single op's x or the grouped op's xs, checked into *in; *xs keeps the tensors.
  absl::Status ReadActivations(tensorflow::OpKernelContext* ctx, tensorflow::OpInputList* xs,
                               lbe::Activations* in) const {
    const char* name = kGrouped ? "xs" : "x";
    TF_RETURN_IF_ERROR(ctx->input_list(name, xs));
    in->dtype = TfElementTypes::Of<T>();
    in->ddof = ddof_;
    in->reserve(xs->size());
    for (int i = 0; i < xs->size(); ++i) {
      const tensorflow::Tensor& x = (*xs)[i];
      TF_RETURN_IF_ERROR(ToStatus(lbe::AddActivation<TfShape>(
          x, x.data(), lbe::ArgName{name, kGrouped ? i : -1}, allow_small_batch_, in)));
    }
    return absl::OkStatus();
  }

  int64_t ddof_;
  bool allow_small_batch_;
};

}  // namespace lbe_tf

// Registers the kernel (the arguments after TStats) of one op for one device and (T, Tstats) pair.
#define LBE_REGISTER_KERNEL(DEVICE, OP, T, TStats, ...)                                       \
  REGISTER_KERNEL_BUILDER(                                                                    \
      Name(OP).Device(DEVICE).TypeConstraint<T>("T").TypeConstraint<TStats>("Tstats"),        \
      __VA_ARGS__)
// The four ops for one device and one (T, Tstats) pair.
#define LBE_REGISTER_KERNELS_FOR_TYPE(DEVICE, DeviceTag, T, TStats)                           \
  LBE_REGISTER_KERNEL(DEVICE, "Lbe>BatchEntropy", T, TStats,                                  \
                      ::lbe_tf::BatchEntropyKernel<DeviceTag, T, false, ::lbe::ForwardCall>); \
  LBE_REGISTER_KERNEL(DEVICE, "Lbe>BatchEntropies", T, TStats,                                \
                      ::lbe_tf::BatchEntropyKernel<DeviceTag, T, true, ::lbe::ForwardCall>);  \
  LBE_REGISTER_KERNEL(DEVICE, "Lbe>BatchEntropyGrad", T, TStats,                              \
                      ::lbe_tf::BatchEntropyKernel<DeviceTag, T, false, ::lbe::BackwardCall>); \
  LBE_REGISTER_KERNEL(DEVICE, "Lbe>BatchEntropiesGrad", T, TStats,                            \
                      ::lbe_tf::BatchEntropyKernel<DeviceTag, T, true, ::lbe::BackwardCall>)

// All four dtypes with their statistics types.
#define LBE_REGISTER_ALL_KERNELS(DEVICE, DeviceTag)                           \
  LBE_REGISTER_KERNELS_FOR_TYPE(DEVICE, DeviceTag, Eigen::half, float);       \
  LBE_REGISTER_KERNELS_FOR_TYPE(DEVICE, DeviceTag, Eigen::bfloat16, float);   \
  LBE_REGISTER_KERNELS_FOR_TYPE(DEVICE, DeviceTag, float, float);             \
  LBE_REGISTER_KERNELS_FOR_TYPE(DEVICE, DeviceTag, double, double)

#endif  // LBE_OPS_TF_BATCH_ENTROPY_KERNELS_H_
