// Registration of the Lbe>* ops and their shape functions.
//
//   Lbe>BatchEntropy(x) -> (entropy, mean, variance[, mean_residual])   x: [B, d1, ...], U = d1 * ...
//   Lbe>BatchEntropyGrad(x, mean, variance, grad_entropy, grad_mean, grad_variance
//                        [, mean_residual]) -> dx
//   Lbe>BatchEntropies(xs[N]) -> (entropies[N], means[S], variances[S][, mean_residuals[S]])
//   Lbe>BatchEntropiesGrad(xs, means, variances, grad_entropies, grad_means, grad_variances
//                          [, mean_residuals]) -> dxs
//
// entropy has the input type T; mean, variance and mean_residual ([U]) have Tstats, which must be
// float64 for float64 inputs and float32 otherwise (the accumulation type). mean_residual is the
// exact mean minus the rounded mean (the low part of a two-term mean), which the gradient needs to
// centre x exactly at any offset (see BackwardArgs in batch_entropy_common.h); it has no gradient.
// It is a list of num_residuals (0 or 1) tensors: lbe_ops asks for 1; with the default 0 the ops
// have three outputs and six gradient inputs, the signature of graphs and SavedModels that hold
// no residuals, which therefore load and run (their gradients centred on the rounded mean).
// The grouped ops keep the statistics of all N tensors in one flat vector each,
// S = U_0 + ... + U_{N-1} long, tensor i's at [U_0 + ... + U_{i-1}, ... + U_i): two outputs and
// four gradient inputs in all, instead of two and four per tensor (for a group of 500 small
// layers, the executor's per-tensor work on 1,000 outputs and 2,000 gradient inputs would cost
// more than the kernels).
//
// A batch B <= ddof has no variance: an InvalidArgument error naming the tensor, unless
// allow_small_batch is true. Then such a tensor is "small" and treated as a constant: entropy,
// mean and variance 0 (all units), dx 0; the group's other tensors are computed as usual. This is
// for the last batch of an epoch (1 sample) and for the empty per-replica batches of a
// distribution strategy (0 samples), where a training step must not fail or produce NaN.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace lbe_tf {
namespace {

using ::tensorflow::DataType;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

absl::Status CheckStatsType(InferenceContext* c) {
  DataType t, tstats;
  TF_RETURN_IF_ERROR(c->GetAttr("T", &t));
  TF_RETURN_IF_ERROR(c->GetAttr("Tstats", &tstats));
  const bool is_double = t == tensorflow::DT_DOUBLE;
  if (is_double != (tstats == tensorflow::DT_DOUBLE)) {
    return tensorflow::errors::InvalidArgument(
        "Tstats must be float64 for float64 inputs and float32 for float16, bfloat16 and "
        "float32 inputs; got T=", tensorflow::DataTypeString(t),
        " and Tstats=", tensorflow::DataTypeString(tstats));
  }
  return absl::OkStatus();
}

// The units of x ([B, d1, ...]) as a [U] shape: d1 * d2 * ..., unknown if any of them is.
absl::Status UnitsShape(InferenceContext* c, ShapeHandle x, ShapeHandle* units) {
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(x, 2, &x));
  if (!c->RankKnown(x)) {
    *units = c->Vector(InferenceContext::kUnknownDim);
    return absl::OkStatus();
  }
  DimensionHandle product = c->MakeDim(1);
  for (int i = 1; i < c->Rank(x); ++i) {
    TF_RETURN_IF_ERROR(c->Multiply(product, c->Dim(x, i), &product));
  }
  *units = c->Vector(product);
  return absl::OkStatus();
}

// The length of the flat statistics of n tensors (inputs 0 .. n-1): the sum of their units.
absl::Status GroupUnitsShape(InferenceContext* c, int n, ShapeHandle* total) {
  DimensionHandle sum = c->MakeDim(0);
  for (int i = 0; i < n; ++i) {
    ShapeHandle units;
    TF_RETURN_IF_ERROR(UnitsShape(c, c->input(i), &units));
    TF_RETURN_IF_ERROR(c->Add(sum, c->Dim(units, 0), &sum));
  }
  *total = c->Vector(sum);
  return absl::OkStatus();
}

// The num_residuals attribute: 0 or 1.
absl::Status GetNumResiduals(InferenceContext* c, int* num_residuals) {
  TF_RETURN_IF_ERROR(c->GetAttr("num_residuals", num_residuals));
  if (*num_residuals > 1) {
    return tensorflow::errors::InvalidArgument("num_residuals must be 0 or 1, got ",
                                               *num_residuals);
  }
  return absl::OkStatus();
}

// The single op is the grouped op's N = 1 case, except that its entropy is a scalar (and its
// gradient's grad_entropy too).
template <bool kGrouped>
absl::Status ForwardShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckStatsType(c));
  int n = 1, num_residuals = 0;
  if (kGrouped) TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
  TF_RETURN_IF_ERROR(GetNumResiduals(c, &num_residuals));
  ShapeHandle total;
  TF_RETURN_IF_ERROR(GroupUnitsShape(c, n, &total));
  c->set_output(0, kGrouped ? c->Vector(n) : c->Scalar());
  c->set_output(1, total);
  c->set_output(2, total);
  if (num_residuals == 1) c->set_output(3, total);
  return absl::OkStatus();
}

template <bool kGrouped>
absl::Status GradShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckStatsType(c));
  int n = 1, num_residuals = 0;
  if (kGrouped) TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
  TF_RETURN_IF_ERROR(GetNumResiduals(c, &num_residuals));
  // Inputs: x or xs[0, n), mean(s) n, variance(s) n+1, grad_entropy(/ies) n+2, grad_mean(s) n+3,
  // grad_variance(s) n+4, and with num_residuals = 1 mean_residual(s) n+5.
  ShapeHandle total, merged, unused;
  TF_RETURN_IF_ERROR(GroupUnitsShape(c, n, &total));
  for (int i : {n, n + 1}) {
    TF_RETURN_IF_ERROR(c->Merge(total, c->input(i), &merged));
  }
  if (kGrouped) {
    TF_RETURN_IF_ERROR(c->WithRank(c->input(n + 2), 1, &unused));
    DimensionHandle unused_dim;
    TF_RETURN_IF_ERROR(c->WithValue(c->Dim(c->input(n + 2), 0), n, &unused_dim));
  } else {
    TF_RETURN_IF_ERROR(c->WithRank(c->input(n + 2), 0, &unused));
  }
  for (int i = n + 3; i < n + 5 + num_residuals; ++i) {  // the statistics' length, or [0]: none
    TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 1, &unused));
  }
  for (int i = 0; i < n; ++i) c->set_output(i, c->input(i));
  return absl::OkStatus();
}

}  // namespace
}  // namespace lbe_tf

REGISTER_OP("Lbe>BatchEntropy")
    .Input("x: T")
    .Output("entropy: T")
    .Output("mean: Tstats")
    .Output("variance: Tstats")
    .Output("mean_residual: num_residuals * Tstats")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tstats: {float, double} = DT_FLOAT")
    .Attr("ddof: int >= 0 = 1")
    .Attr("allow_small_batch: bool = false")
    .Attr("num_residuals: int >= 0 = 0")
    .SetShapeFn(lbe_tf::ForwardShape<false>)
    .Doc(R"doc(
Batch entropy of x viewed as [B, U]: mean over units of 0.5 * ln(pi * e * var + 1), with the
per-unit variance over the batch (ddof delta degrees of freedom). Also returns the per-unit mean
and variance in Tstats (float64 for float64 inputs, else float32), and with num_residuals = 1
mean_residual, the exact mean minus the rounded one, for the gradient. A batch <= ddof is an
error, unless allow_small_batch: then entropy, mean, variance and mean_residual are 0.
)doc");

REGISTER_OP("Lbe>BatchEntropyGrad")
    .Input("x: T")
    .Input("mean: Tstats")
    .Input("variance: Tstats")
    .Input("grad_entropy: T")
    .Input("grad_mean: Tstats")      // [U], or [0] for none
    .Input("grad_variance: Tstats")  // [U], or [0] for none
    .Input("mean_residual: num_residuals * Tstats")  // [U], or [0] for none
    .Output("dx: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tstats: {float, double} = DT_FLOAT")
    .Attr("ddof: int >= 0 = 1")
    .Attr("allow_small_batch: bool = false")
    .Attr("num_residuals: int >= 0 = 0")
    .SetShapeFn(lbe_tf::GradShape<false>)
    .Doc(R"doc(
Gradient of Lbe>BatchEntropy with respect to x, in one pass over x, centred on the two-term mean
mean + mean_residual (on mean where num_residuals = 0). With allow_small_batch, a batch <= ddof
gets dx = 0.
)doc");

REGISTER_OP("Lbe>BatchEntropies")
    .Input("xs: N * T")
    .Output("entropies: T")
    .Output("means: Tstats")
    .Output("variances: Tstats")
    .Output("mean_residuals: num_residuals * Tstats")
    .Attr("N: int >= 1")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tstats: {float, double} = DT_FLOAT")
    .Attr("ddof: int >= 0 = 1")
    .Attr("allow_small_batch: bool = false")
    .Attr("num_residuals: int >= 0 = 0")
    .SetShapeFn(lbe_tf::ForwardShape<true>)
    .Doc(R"doc(
Lbe>BatchEntropy of each of N tensors (shapes may differ) in one op. means, variances and
mean_residuals hold the per-unit statistics of all tensors one after another (tensor 0's units
first). With
allow_small_batch, a tensor whose batch is <= ddof gets entropy, mean and variance 0 instead of an
error; the others are computed as usual.
)doc");

REGISTER_OP("Lbe>BatchEntropiesGrad")
    .Input("xs: N * T")
    .Input("means: Tstats")
    .Input("variances: Tstats")
    .Input("grad_entropies: T")
    .Input("grad_means: Tstats")      // like means, or [0] for none
    .Input("grad_variances: Tstats")  // like variances, or [0] for none
    .Input("mean_residuals: num_residuals * Tstats")  // like means, or [0] for none
    .Output("dxs: N * T")
    .Attr("N: int >= 1")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tstats: {float, double} = DT_FLOAT")
    .Attr("ddof: int >= 0 = 1")
    .Attr("allow_small_batch: bool = false")
    .Attr("num_residuals: int >= 0 = 0")
    .SetShapeFn(lbe_tf::GradShape<true>)
    .Doc(R"doc(
Gradient of Lbe>BatchEntropies with respect to each of the N tensors. With allow_small_batch, a
tensor whose batch is <= ddof gets dx = 0.
)doc");
