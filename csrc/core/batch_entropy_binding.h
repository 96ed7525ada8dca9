// What every binding of the core (the TensorFlow ops, the pybind11 module) shares: the checks of
// the activations with their error messages, and the one place that fills ForwardArgs /
// BackwardArgs. Framework-free; errors come back as strings, which each binding turns into its
// own error type, so the messages are the same everywhere.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_BINDING_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_BINDING_H_

#include <cstdint>
#include <string>
#include <vector>

#include "batch_entropy_common.h"
#include "batch_entropy_dtype.h"

namespace lbe {

// ---------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------

// The name of one argument in error messages: "x", or "xs[3]". Spelled out only when an error is
// reported (building the strings for every tensor of a 500-tensor group, on every call, would be a
// measurable part of the grouped ops' time).
struct ArgName {
  const char* base;
  int64_t index;  // -1: not a list element
  std::string str() const {
    return index < 0 ? std::string(base) : std::string(base) + "[" + std::to_string(index) + "]";
  }
};

// The activations of one call, checked, as the [batch, units] views the core takes. The
// statistics of all of them lie one after another in flat vectors of total_units. small[i]:
// batch <= ddof, let through by allow_small_batch (the core must not see such a tensor).
struct Activations {
  DType dtype = DType::kFloat32;
  int64_t ddof = 1;
  std::vector<const void*> x;
  std::vector<int64_t> batch, units;
  std::vector<bool> small;
  int num_small = 0;
  int64_t total_units = 0;

  int size() const { return static_cast<int>(x.size()); }
  void reserve(size_t n) {
    x.reserve(n);
    batch.reserve(n);
    units.reserve(n);
    small.reserve(n);
  }
};

// Checks one activation tensor and appends it to *a. Shape is an adapter over the binding's
// tensor type with
//   static int64_t Rank(const Tensor&);
//   static int64_t Dim(const Tensor&, int64_t d);         // d < Rank, non-negative sizes
//   static std::string String(const Tensor&);             // the shape as the binding prints it
// Returns "" or the error; a batch <= ddof is an error unless allow_small_batch.
template <typename Shape, typename Tensor>
std::string AddActivation(const Tensor& t, const void* data, const ArgName& name, bool allow_small_batch,
                          Activations* a) {
  const int64_t rank = Shape::Rank(t);
  if (rank < 2) return name.str() + " must have rank >= 2 ([batch, units...]), got shape " + Shape::String(t);
  const int64_t batch = Shape::Dim(t, 0);
  const bool small = batch <= a->ddof;
  if (small && !allow_small_batch) {
    return name.str() + " has a batch of " + std::to_string(batch) + ", but batch entropy with ddof=" +
           std::to_string(a->ddof) + " needs a batch of at least " + std::to_string(a->ddof + 1) + " (shape " +
           Shape::String(t) + ")";
  }
  // The product of the other dimensions, not the element count / batch: the batch may be 0.
  int64_t units = 1;
  bool overflow = false;
  for (int64_t d = 1; d < rank; ++d) overflow |= __builtin_mul_overflow(units, Shape::Dim(t, d), &units);
  if (overflow) return name.str() + " has more units than int64 holds (shape " + Shape::String(t) + ")";
  if (units == 0) return name.str() + " has zero units (shape " + Shape::String(t) + ")";
  a->x.push_back(data);
  a->batch.push_back(batch);
  a->units.push_back(units);
  a->small.push_back(small);
  a->num_small += small;
  a->total_units += units;
  return std::string();
}

// For bindings whose tensors carry their dtype: the group's dtype is its first tensor's (name's
// index 0); returns "" or the error for a later tensor of another dtype. Call before AddActivation.
inline std::string CheckGroupDType(DType dtype, const ArgName& name, Activations* a) {
  if (a->size() == 0) {
    a->dtype = dtype;
    return std::string();
  }
  if (dtype == a->dtype) return std::string();
  return name.str() + " has dtype " + DTypeName(dtype) + " but " + ArgName{name.base, 0}.str() + " has " +
         DTypeName(a->dtype) + "; all tensors of a group share one dtype";
}

// ---------------------------------------------------------------------------------------------
// The core's descriptors
// ---------------------------------------------------------------------------------------------

// ForwardArgs or BackwardArgs with the activations' fields filled.
template <typename Args>
Args ActivationArgs(const Activations& in) {
  Args args;
  args.dtype = in.dtype;
  args.ddof = in.ddof;
  args.num_tensors = in.size();
  args.x = in.x.data();
  args.batch = in.batch.data();
  args.units = in.units.data();
  return args;
}

// One call's per-tensor pointers, which the descriptor points into (so a call must outlive the
// descriptor it hands out). Null entries of grad_mean / grad_variance: no gradient.
struct ForwardCall {
  Activations in;
  std::vector<void*> mean, variance;
  std::vector<void*> mean_residual;  // empty: not asked for
  void* entropy = nullptr;  // [num_tensors], dtype

  ForwardArgs Args() const {
    ForwardArgs args = ActivationArgs<ForwardArgs>(in);
    args.mean = mean.data();
    args.variance = variance.data();
    args.entropy = entropy;
    args.mean_residual = mean_residual.empty() ? nullptr : mean_residual.data();
    return args;
  }

  // Calls f on each vector of per-tensor pointers (mean_residual may be empty).
  template <typename F>
  void ForEachTensorPointers(F&& f) {
    f(mean);
    f(variance);
    f(mean_residual);
  }
};

struct BackwardCall {
  Activations in;
  std::vector<const void*> mean, variance, grad_mean, grad_variance, mean_residual;
  const void* grad_entropy = nullptr;  // [num_tensors], dtype
  std::vector<void*> dx;

  BackwardArgs Args() const {
    BackwardArgs args = ActivationArgs<BackwardArgs>(in);
    args.mean = mean.data();
    args.variance = variance.data();
    args.grad_entropy = grad_entropy;
    args.grad_mean = grad_mean.empty() ? nullptr : grad_mean.data();
    args.grad_variance = grad_variance.empty() ? nullptr : grad_variance.data();
    args.dx = dx.data();
    args.mean_residual = mean_residual.empty() ? nullptr : mean_residual.data();
    return args;
  }

  // Calls f on each vector of per-tensor pointers (grad_mean, grad_variance, mean_residual may be
  // empty: none).
  template <typename F>
  void ForEachTensorPointers(F&& f) {
    f(mean);
    f(variance);
    f(grad_mean);
    f(grad_variance);
    f(mean_residual);
    f(dx);
  }
};

// The entries of a per-tensor vector at the indices `kept`, in order.
template <typename E>
std::vector<E> Select(const std::vector<E>& all, const std::vector<int>& kept) {
  std::vector<E> out;
  out.reserve(kept.size());
  for (int i : kept) out.push_back(all[i]);
  return out;
}

inline Activations Select(const Activations& all, const std::vector<int>& kept) {
  Activations out;
  out.dtype = all.dtype;
  out.ddof = all.ddof;
  out.x = Select(all.x, kept);
  out.batch = Select(all.batch, kept);
  out.units = Select(all.units, kept);
  out.small = Select(all.small, kept);
  for (int i : kept) {
    out.num_small += all.small[i];
    out.total_units += all.units[i];
  }
  return out;
}

// The call restricted to the tensors `kept`; the per-call pointer (entropy, grad_entropy) is kept
// as it is, for the caller to replace.
template <typename Call>
Call Select(const Call& all, const std::vector<int>& kept) {
  Call out = all;
  out.in = Select(all.in, kept);
  out.ForEachTensorPointers([&](auto& pointers) {
    if (!pointers.empty()) pointers = Select(pointers, kept);
  });
  return out;
}

}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_BINDING_H_
