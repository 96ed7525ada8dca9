// The wide path: one unit's statistics and gradient factors in double, with the values scaled by
// a power of two, for the inputs the fast kernels' accumulators cannot hold. The fast kernels
// accumulate in the statistics type (float32 for half, bfloat16 and float32 inputs), whose sums
// of squares overflow once |x - mean| reaches about 1e19 / sqrt(batch), and whose per-unit
// gradient factor pi*e / (U (B - ddof) (pi*e*v + 1)) underflows for variances far above 1e30.
// The fast kernels detect both cheaply (a non-finite entropy term; a variance above a threshold
// derived from the upstream gradient) and hand only those units to the functions below.
//
// Scaling: the values of a unit are multiplied by c = 2^-k, with 2^k about max |x| (k >= 0), which
// is exact (a power of two) for every value that stays normal, and keeps the sum of squares in
// range even for float64 inputs near their largest value. The variance is var_s * 2^(2k), the
// entropy term 0.5 * ln(pi*e * var + 1) = 0.5 * (ln(pi*e * var_s + 2^-2k) + 2k ln 2).
//
// NaN and Inf: a NaN anywhere gives NaN mean, variance and entropy; +-Inf (no NaN) gives a mean of
// +-Inf (NaN when both signs occur) and NaN variance and entropy: what the formula's arithmetic
// gives, and what the pure-TensorFlow path gives.
//
// Framework-free; compiled as host code for the CPU kernels and the CUDA emulation, and as
// device code by nvcc.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_WIDE_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_WIDE_H_

#include <cstdint>

#if !defined(__CUDACC__)
#include <cmath>
#endif

#include "batch_entropy_common.h"

#if defined(__CUDACC__)
#define LBE_WIDE_FN __host__ __device__ inline
#else
#define LBE_WIDE_FN inline
#endif

namespace lbe {
namespace wide {

constexpr double kLn2 = 0.69314718055994530942;

LBE_WIDE_FN bool IsFinite(double v) { return v - v == 0.0; }
LBE_WIDE_FN double Abs(double v) { return v < 0.0 ? -v : v; }
LBE_WIDE_FN double Scale2(double v, int k) { return ::ldexp(v, k); }  // v * 2^k, exact when normal

// The scale exponent for values whose largest magnitude is max_abs: k >= 0 with max_abs * 2^-k in
// [0.5, 1), or 0 for values below 1, zeros, and non-finite max_abs; at most 1022, so that 2^-k is
// a normal number (a subnormal one would read as 0 where denormals are flushed).
LBE_WIDE_FN int ScaleExponent(double max_abs) {
  if (!IsFinite(max_abs) || !(max_abs >= 1.0)) return 0;
  int k = 0;
  ::frexp(max_abs, &k);
  return k > 1022 ? 1022 : k;
}

// 0.5 * ln(pi*e * var_s * 2^(2k) + 1), for a variance var_s * 2^(2k) that may not be representable.
LBE_WIDE_FN double EntropyTerm(double scaled_variance, int k) {
  if (k == 0) return 0.5 * ::log1p(kPiE * scaled_variance);
  if (scaled_variance == 0.0) return 0.0;
  return 0.5 * (::log(kPiE * scaled_variance + Scale2(1.0, -2 * k)) + 2.0 * k * kLn2);
}

// The rounding error of sum = fl(a + b): (a + b) - sum exactly (Knuth's TwoSum, no branch and
// no product, so neither operand order nor FMA contraction matters), or 0 where sum is not
// finite. F is float or double.
template <typename F>
LBE_WIDE_FN F SumResidual(F a, F b, F sum) {
  if (!(sum - sum == F(0))) return F(0);
  const F b_part = sum - a;
  return (a - (sum - b_part)) + (b - b_part);
}

// The residual of mean rounded to the statistics type Acc: (mean + mean_residual) - fl_Acc(mean),
// mean and mean_residual being a double two-term mean (0 where the rounded mean is not finite).
template <typename Acc>
LBE_WIDE_FN Acc RoundedMeanResidual(double mean, double mean_residual) {
  const Acc rounded = static_cast<Acc>(mean);
  if (!(rounded - rounded == Acc(0))) return Acc(0);
  return static_cast<Acc>((mean - static_cast<double>(rounded)) + mean_residual);
}

struct UnitMoments {
  double mean;             // the unit's mean (unscaled)
  double mean_residual;    // the exact mean minus `mean`, to double rounding (0 if not finite)
  double scaled_variance;  // the variance times 2^(-2k)
  int k;                   // the scale exponent
  double entropy;          // H_j
  LBE_WIDE_FN double Variance() const { return Scale2(scaled_variance, 2 * k); }  // +inf if out of range
};

// Mean, variance and entropy term of one unit, load(r) giving its value in row r (as double).
// Three passes over the column: the largest magnitude, then the exact two-pass moments of the
// scaled values, shifted by the first row's value (the pivot) so that an offset far above the
// spread costs nothing.
template <typename Load>
LBE_WIDE_FN UnitMoments ComputeUnitMoments(const Load& load, int64_t rows, int64_t ddof) {
  double max_abs = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const double a = Abs(load(r));
    max_abs = a > max_abs ? a : max_abs;
  }
  UnitMoments m;
  m.k = ScaleExponent(max_abs);
  const double c = Scale2(1.0, -m.k);
  double pivot = load(0) * c;
  if (!IsFinite(pivot)) pivot = 0.0;
  double sum = 0.0;
  for (int64_t r = 0; r < rows; ++r) sum += load(r) * c - pivot;
  const double shifted_mean = sum / static_cast<double>(rows);
  double m2 = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const double d = (load(r) * c - pivot) - shifted_mean;
    m2 += d * d;
  }
  const double mean_c = pivot + shifted_mean;
  m.mean = Scale2(mean_c, m.k);
  m.mean_residual = IsFinite(m.mean) ? Scale2(SumResidual(pivot, shifted_mean, mean_c), m.k) : 0.0;
  m.scaled_variance = m2 / static_cast<double>(rows - ddof);
  m.entropy = EntropyTerm(m.scaled_variance, m.k);
  return m;
}

// dx = (x * c - mean_c) * scale + shift for one unit, every factor in double: the scaled form of
// dx = (x - mean - mean_residual) * (g dH/dx factor + gv * 2 / (B - ddof)) + gm / B, the
// residual's share folded into shift.
struct UnitGradient {
  double c;       // 2^-k
  double mean_c;  // mean * c
  double scale;
  double shift;
  LBE_WIDE_FN double Dx(double x) const { return (x * c - mean_c) * scale + shift; }
};

// For a unit with the given two-term mean (mean + mean_residual) and variance (variance =
// scaled_variance * 2^(2k)); g is the upstream gradient of the entropy, units = U, dof = B - ddof,
// gv and gm the upstream gradients of the variance and the mean.
LBE_WIDE_FN UnitGradient ComputeUnitGradient(double mean, double mean_residual,
                                             double scaled_variance, int k, double g,
                                             double units, double dof, double gv, double gm,
                                             double batch) {
  UnitGradient u;
  u.c = Scale2(1.0, -k);
  u.mean_c = mean * u.c;
  // g pi*e / (U dof (pi*e var + 1)) / c, with the O(1) quotient formed before the power of two.
  const double quotient = g * kPiE / (units * dof * (kPiE * scaled_variance + Scale2(1.0, -2 * k)));
  u.scale = Scale2(quotient, -k) + (gv == 0.0 ? 0.0 : Scale2(gv * 2.0 / dof, k));
  u.shift = gm / batch - (mean_residual * u.c) * u.scale;
  return u;
}

// The scale exponent that brings a finite variance to about 1 (var * 2^-2k in [1/8, 2)); 0 for
// variances up to 1 and for non-finite ones.
LBE_WIDE_FN int VarianceExponent(double variance) {
  if (!IsFinite(variance) || !(variance > 1.0)) return 0;
  int e = 0;
  ::frexp(variance, &e);
  return e / 2;
}

// The fast backward kernels compute the per-unit factor as numerator / (pi*e var + 1) in the
// statistics type; it loses precision (subnormal) or underflows to zero where that quotient is
// below 2^-100 in float32 (2^-1000 in float64). Units whose variance exceeds this threshold, for
// an upstream numerator g pi*e / (U dof), take the wide path. Returns +inf when the numerator is
// zero (then the factor is exactly zero on either path).
LBE_WIDE_FN double WideVarianceThreshold(double numerator, bool float64_stats) {
  const double a = Abs(numerator);
  if (a == 0.0) return 1.0 / 0.0;
  return a * Scale2(1.0, float64_stats ? 1000 : 100) / kPiE;
}

}  // namespace wide
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_WIDE_H_
