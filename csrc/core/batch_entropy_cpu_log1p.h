// Part of the CPU kernel bodies, compiled once per instruction set inside the namespace that
// LBE_CPU_ISA names; included through batch_entropy_cpu_impl.h only. This part: log1p to
// float precision, four at a time in double.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CPU_LOG1P_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CPU_LOG1P_H_

#include "batch_entropy_cpu_simd.h"

namespace lbe {
namespace cpu {
namespace LBE_CPU_ISA {

// log1p(z) to float precision for z >= 0 (or NaN, +inf) given in float, four at a time in double:
// u = 1 + z is exact for z >= 2^-29, so log1p(z) = log(u) = e * ln2 + 2 atanh((m - 1) / (m + 1))
// with u = 2^e * m, m in [sqrt(1/2), sqrt(2)); below 2^-29 log1p(z) = z to float precision. The
// series' truncation error is below 1e-11, far under a float ulp. (Not libm's log1pf: one call
// per unit would be the largest cost of a group of many small tensors.)
inline D4 Log1pFloatPrecision(D4 z) {
  const D4 u = z + 1.0;
  const U4 bits = Bits<U4>(u);
  // The biased exponent as a double, exactly, without AVX2's missing int64 -> double conversion.
  D4 exponent = Bits<D4>(((bits >> 52) & 0x7ffu) | 0x4330000000000000u) - (0x1p52 + 1023.0);
  D4 m = Bits<D4>((bits & 0x000fffffffffffffu) | 0x3ff0000000000000u);
  const I4 high = m > 1.4142135623730951;
  m = high ? m * 0.5 : m;
  exponent = high ? exponent + 1.0 : exponent;
  const D4 t = (m - 1.0) / (m + 1.0);
  const D4 t2 = t * t;
  const D4 series =
      1.0 + t2 * (1.0 / 3 + t2 * (1.0 / 5 + t2 * (1.0 / 7 + t2 * (1.0 / 9 + t2 * (1.0 / 11)))));
  const D4 log_u = exponent * 0.69314718055994531 + 2.0 * t * series;
  D4 result = z < 0x1p-29 ? z : log_u;
  result = ((u == u) & (u != __builtin_huge_val())) ? result : u;  // NaN and +inf pass through
  return result;
}

}  // namespace LBE_CPU_ISA
}  // namespace cpu
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CPU_LOG1P_H_
