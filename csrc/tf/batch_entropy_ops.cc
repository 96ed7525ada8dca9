// Registration of the Lbe>* ops and their shape functions.
//
//   Lbe>BatchEntropy(x) -> (entropy, mean, variance)           x: [B, d1, ...], U = d1 * ...
//   Lbe>BatchEntropyGrad(x, mean, variance, grad_entropy, grad_mean, grad_variance) -> dx
//   Lbe>BatchEntropies(xs[N]) -> (entropies[N], means[S], variances[S])
//   Lbe>BatchEntropiesGrad(xs, means, variances, grad_entropies, grad_means, grad_variances) -> dxs
//
// entropy has the input type T; mean and variance ([U]) have Tstats, which must be float64 for
// float64 inputs and float32 otherwise (the accumulation type). The grouped ops keep the
// statistics of all N tensors in one flat vector each, S = U_0 + ... + U_{N-1} long, tensor i's
// at [U_0 + ... + U_{i-1}, ... + U_i): two outputs and four gradient inputs in all, instead of two
// and four per tensor (for a group of 500 small layers, the executor's per-tensor work on 1,000
// outputs and 2,000 gradient inputs cost more than the kernels).
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

absl::Status BatchEntropyShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckStatsType(c));
  ShapeHandle units;
  TF_RETURN_IF_ERROR(UnitsShape(c, c->input(0), &units));
  c->set_output(0, c->Scalar());
  c->set_output(1, units);
  c->set_output(2, units);
  return absl::OkStatus();
}

absl::Status BatchEntropyGradShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckStatsType(c));
  ShapeHandle units, merged, unused;
  TF_RETURN_IF_ERROR(UnitsShape(c, c->input(0), &units));
  for (int i : {1, 2}) {
    TF_RETURN_IF_ERROR(c->Merge(units, c->input(i), &merged));
  }
  // grad_mean and grad_variance are [U], or [0] when no gradient reached that output.
  for (int i : {4, 5}) {
    TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 1, &unused));
  }
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &unused));
  c->set_output(0, c->input(0));
  return absl::OkStatus();
}

// The length of the flat statistics of a group: the sum of the tensors' units.
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

absl::Status BatchEntropiesShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckStatsType(c));
  int n;
  TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
  ShapeHandle total;
  TF_RETURN_IF_ERROR(GroupUnitsShape(c, n, &total));
  c->set_output(0, c->Vector(n));
  c->set_output(1, total);
  c->set_output(2, total);
  return absl::OkStatus();
}

absl::Status BatchEntropiesGradShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckStatsType(c));
  int n;
  TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
  // Inputs: xs[0, n), means n, variances n+1, grad_entropies n+2, grad_means n+3,
  // grad_variances n+4.
  ShapeHandle total, merged, unused;
  TF_RETURN_IF_ERROR(GroupUnitsShape(c, n, &total));
  for (int i : {n, n + 1}) {
    TF_RETURN_IF_ERROR(c->Merge(total, c->input(i), &merged));
  }
  TF_RETURN_IF_ERROR(c->WithRank(c->input(n + 2), 1, &unused));
  DimensionHandle unused_dim;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(c->input(n + 2), 0), n, &unused_dim));
  for (int i : {n + 3, n + 4}) {  // [S], or [0]: no gradient
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
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tstats: {float, double} = DT_FLOAT")
    .Attr("ddof: int >= 0 = 1")
    .SetShapeFn(lbe_tf::BatchEntropyShape)
    .Doc(R"doc(
Batch entropy of x viewed as [B, U]: mean over units of 0.5 * ln(pi * e * var + 1), with the
per-unit variance over the batch (ddof delta degrees of freedom). Also returns the per-unit mean
and variance in Tstats (float64 for float64 inputs, else float32).
)doc");

REGISTER_OP("Lbe>BatchEntropyGrad")
    .Input("x: T")
    .Input("mean: Tstats")
    .Input("variance: Tstats")
    .Input("grad_entropy: T")
    .Input("grad_mean: Tstats")      // [U], or [0] for none
    .Input("grad_variance: Tstats")  // [U], or [0] for none
    .Output("dx: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tstats: {float, double} = DT_FLOAT")
    .Attr("ddof: int >= 0 = 1")
    .SetShapeFn(lbe_tf::BatchEntropyGradShape)
    .Doc("Gradient of Lbe>BatchEntropy with respect to x, in one pass over x.");

REGISTER_OP("Lbe>BatchEntropies")
    .Input("xs: N * T")
    .Output("entropies: T")
    .Output("means: Tstats")
    .Output("variances: Tstats")
    .Attr("N: int >= 1")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tstats: {float, double} = DT_FLOAT")
    .Attr("ddof: int >= 0 = 1")
    .SetShapeFn(lbe_tf::BatchEntropiesShape)
    .Doc(R"doc(
Lbe>BatchEntropy of each of N tensors (shapes may differ) in one op. means and variances hold the
per-unit statistics of all tensors one after another (tensor 0's units first).
)doc");

REGISTER_OP("Lbe>BatchEntropiesGrad")
    .Input("xs: N * T")
    .Input("means: Tstats")
    .Input("variances: Tstats")
    .Input("grad_entropies: T")
    .Input("grad_means: Tstats")      // like means, or [0] for none
    .Input("grad_variances: Tstats")  // like variances, or [0] for none
    .Output("dxs: N * T")
    .Attr("N: int >= 1")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tstats: {float, double} = DT_FLOAT")
    .Attr("ddof: int >= 0 = 1")
    .SetShapeFn(lbe_tf::BatchEntropiesGradShape)
    .Doc("Gradient of Lbe>BatchEntropies with respect to each of the N tensors.");
