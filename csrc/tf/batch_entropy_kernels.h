// OpKernels of the Lbe>* ops, shared by CPU and GPU. Thin: validate the inputs (errors name the
// argument), allocate the outputs, fill the core's descriptors and hand them to
// Launcher<Device>, which each device file (batch_entropy_kernels.cc for the CPU,
// batch_entropy_kernels_gpu.cc for CUDA) specializes.
#ifndef LBE_OPS_TF_BATCH_ENTROPY_KERNELS_H_
#define LBE_OPS_TF_BATCH_ENTROPY_KERNELS_H_

#include <string>
#include <vector>

#include "batch_entropy_common.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"

namespace lbe_tf {

struct CpuDevice {};
struct GpuDevice {};

// Each device specializes this: enqueue (or run) the core on that device.
template <typename Device>
struct Launcher {
  static absl::Status Forward(tensorflow::OpKernelContext* ctx, const lbe::ForwardArgs& args);
  static absl::Status Backward(tensorflow::OpKernelContext* ctx, const lbe::BackwardArgs& args);
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

// Checks one activation tensor and returns its [batch, units] view.
inline absl::Status CheckActivation(const tensorflow::Tensor& x, const ArgName& name,
                                    int64_t ddof, int64_t* batch, int64_t* units) {
  if (x.dims() < 2) {
    return tensorflow::errors::InvalidArgument(
        name.str(), " must have rank >= 2 ([batch, units...]), got shape ", x.shape().DebugString());
  }
  *batch = x.dim_size(0);
  if (*batch <= ddof) {
    return tensorflow::errors::InvalidArgument(
        name.str(), " has a batch of ", *batch, ", but batch entropy with ddof=", ddof,
        " needs a batch of at least ", ddof + 1, " (shape ", x.shape().DebugString(), ")");
  }
  *units = x.NumElements() / *batch;
  if (*units == 0) {
    return tensorflow::errors::InvalidArgument(name.str(), " has zero units (shape ",
                                               x.shape().DebugString(), ")");
  }
  return absl::OkStatus();
}

inline absl::Status CheckStats(const tensorflow::Tensor& t, const ArgName& name, int64_t units) {
  if (t.dims() != 1 || t.dim_size(0) != units) {
    return tensorflow::errors::InvalidArgument(name.str(), " must have shape [", units, "], got ",
                                               t.shape().DebugString());
  }
  return absl::OkStatus();
}

// A gradient for a statistic: [units], or [0] when none reached it (then *data is null).
inline absl::Status CheckOptionalStats(const tensorflow::Tensor& t, const ArgName& name,
                                       int64_t units, const void** data) {
  if (t.dims() == 1 && t.dim_size(0) == 0) {
    *data = nullptr;
    return absl::OkStatus();
  }
  if (t.dims() != 1 || t.dim_size(0) != units) {
    return tensorflow::errors::InvalidArgument(name.str(), " must have shape [", units,
                                               "] (or [0] for no gradient), got ",
                                               t.shape().DebugString());
  }
  *data = t.data();
  return absl::OkStatus();
}

inline ArgName Indexed(const char* name, bool grouped, int i) { return ArgName{name, grouped ? i : -1}; }

template <typename Device, typename T, typename TStats, bool kGrouped>
class BatchEntropyOp : public tensorflow::OpKernel {
 public:
  explicit BatchEntropyOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("ddof", &ddof_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    tensorflow::OpInputList xs;
    OP_REQUIRES_OK(ctx, ctx->input_list(kGrouped ? "xs" : "x", &xs));
    const int n = xs.size();
    std::vector<const void*> x_ptrs(n);
    std::vector<void*> mean_ptrs(n), var_ptrs(n);
    std::vector<int64_t> batch(n), units(n);
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES_OK(ctx, CheckActivation(xs[i], Indexed(kGrouped ? "xs" : "x", kGrouped, i), ddof_,
                                          &batch[i], &units[i]));
      x_ptrs[i] = xs[i].data();
    }
    tensorflow::Tensor* entropy = nullptr;
    const tensorflow::TensorShape entropy_shape =
        kGrouped ? tensorflow::TensorShape({n}) : tensorflow::TensorShape({});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, entropy_shape, &entropy));
    for (int i = 0; i < n; ++i) {
      tensorflow::Tensor *mean = nullptr, *variance = nullptr;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(1 + i, {units[i]}, &mean));
      OP_REQUIRES_OK(ctx, ctx->allocate_output(1 + n + i, {units[i]}, &variance));
      mean_ptrs[i] = mean->data();
      var_ptrs[i] = variance->data();
    }
    lbe::ForwardArgs args;
    args.dtype = CoreDType<T>::value;
    args.ddof = ddof_;
    args.num_tensors = n;
    args.x = x_ptrs.data();
    args.batch = batch.data();
    args.units = units.data();
    args.mean = mean_ptrs.data();
    args.variance = var_ptrs.data();
    args.entropy = entropy->data();
    OP_REQUIRES_OK(ctx, Launcher<Device>::Forward(ctx, args));
  }

 private:
  int64_t ddof_;
};

template <typename Device, typename T, typename TStats, bool kGrouped>
class BatchEntropyGradOp : public tensorflow::OpKernel {
 public:
  explicit BatchEntropyGradOp(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("ddof", &ddof_));
  }

  void Compute(tensorflow::OpKernelContext* ctx) override {
    tensorflow::OpInputList xs, means, variances, grad_means, grad_variances;
    OP_REQUIRES_OK(ctx, ctx->input_list(kGrouped ? "xs" : "x", &xs));
    OP_REQUIRES_OK(ctx, ctx->input_list(kGrouped ? "means" : "mean", &means));
    OP_REQUIRES_OK(ctx, ctx->input_list(kGrouped ? "variances" : "variance", &variances));
    OP_REQUIRES_OK(ctx, ctx->input_list(kGrouped ? "grad_means" : "grad_mean", &grad_means));
    OP_REQUIRES_OK(ctx, ctx->input_list(kGrouped ? "grad_variances" : "grad_variance",
                                        &grad_variances));
    const tensorflow::Tensor& grad_entropy = ctx->input(3 * xs.size());
    const int n = xs.size();
    if (kGrouped) {
      OP_REQUIRES(ctx, grad_entropy.dims() == 1 && grad_entropy.dim_size(0) == n,
                  tensorflow::errors::InvalidArgument("grad_entropies must have shape [", n,
                                                      "], got ", grad_entropy.shape().DebugString()));
    } else {
      OP_REQUIRES(ctx, grad_entropy.dims() == 0,
                  tensorflow::errors::InvalidArgument("grad_entropy must be a scalar, got shape ",
                                                      grad_entropy.shape().DebugString()));
    }
    std::vector<const void*> x_ptrs(n), mean_ptrs(n), var_ptrs(n), gmean_ptrs(n), gvar_ptrs(n);
    std::vector<void*> dx_ptrs(n);
    std::vector<int64_t> batch(n), units(n);
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES_OK(ctx, CheckActivation(xs[i], Indexed(kGrouped ? "xs" : "x", kGrouped, i), ddof_,
                                          &batch[i], &units[i]));
      OP_REQUIRES_OK(ctx, CheckStats(means[i], Indexed(kGrouped ? "means" : "mean", kGrouped, i), units[i]));
      OP_REQUIRES_OK(ctx, CheckStats(variances[i], Indexed(kGrouped ? "variances" : "variance", kGrouped, i), units[i]));
      OP_REQUIRES_OK(ctx, CheckOptionalStats(grad_means[i], Indexed(kGrouped ? "grad_means" : "grad_mean", kGrouped, i), units[i], &gmean_ptrs[i]));
      OP_REQUIRES_OK(ctx, CheckOptionalStats(grad_variances[i], Indexed(kGrouped ? "grad_variances" : "grad_variance", kGrouped, i), units[i], &gvar_ptrs[i]));
      tensorflow::Tensor* dx = nullptr;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(i, xs[i].shape(), &dx));
      x_ptrs[i] = xs[i].data();
      mean_ptrs[i] = means[i].data();
      var_ptrs[i] = variances[i].data();
      dx_ptrs[i] = dx->data();
    }
    lbe::BackwardArgs args;
    args.dtype = CoreDType<T>::value;
    args.ddof = ddof_;
    args.num_tensors = n;
    args.x = x_ptrs.data();
    args.batch = batch.data();
    args.units = units.data();
    args.mean = mean_ptrs.data();
    args.variance = var_ptrs.data();
    args.grad_entropy = grad_entropy.data();
    args.grad_mean = gmean_ptrs.data();
    args.grad_variance = gvar_ptrs.data();
    args.dx = dx_ptrs.data();
    OP_REQUIRES_OK(ctx, Launcher<Device>::Backward(ctx, args));
  }

 private:
  int64_t ddof_;
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
