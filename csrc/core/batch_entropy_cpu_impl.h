// The CPU kernel bodies. This header is compiled twice, once per instruction set (see
// batch_entropy_cpu_generic.cc and batch_entropy_cpu_avx2.cc), inside the namespace that
// LBE_CPU_ISA names; batch_entropy_cpu.cc picks one at run time.
// The code is split by concern into batch_entropy_cpu_simd.h (element and vector types),
// _moments.h (merging and centering), _items.h (running and prefetching work items), _tiles.h
// (chunk passes and register tiles), _log1p.h, _forward.h and _backward.h; the .cc files include
// this header only.
//
// Forward, per work item (a block of units over a segment of rows, see batch_entropy_cpu_plan.h):
// every unit is shifted by its value in row 0 (the pivot, LoadPivots), so a mean far larger than
// the spread costs no accuracy; for each chunk of kChunkRows rows, a sum pass and a centering
// pass (the chunk is still in cache for the second) give (n, mean, M2) of the shifted values;
// chunks and then segments are merged pairwise (Chan et al.), so the error grows with
// log(batch), not batch. Units whose statistics come out non-finite go to the wide path
// (batch_entropy_wide.h, FinishBlock). Both passes walk the rows front to back, four rows at a time, with the
// unit loop innermost and vectorized (GCC vector extensions: 256-bit AVX2 in the avx2 build, pairs
// of SSE2 registers in the generic one); units past the last full vector take a scalar loop with
// the same arithmetic. Narrow blocks (at most kNarrowVectors vectors of units, a deep network's
// layers) run the same arithmetic with the rows innermost and the accumulators in registers.
// Backward: dx = (x - mean) * s + t per unit, x read once and dx written once, a run of whole rows
// per item where the rows are narrow enough; narrow blocks hold s, t and the means in registers.
// Items with a variance so large that s would underflow take the wide path (WideBackwardItem).
// Both passes prefetch the next work item while they compute (ItemPrefetcher), except the
// backward pass of narrow blocks: there the prefetches cost as much as the loop itself when the
// group is in the last-level cache, and save nothing when it is not.
#ifndef LBE_CPU_ISA
#error "define LBE_CPU_ISA before including batch_entropy_cpu_impl.h"
#endif

#include "batch_entropy_common.h"
#include "batch_entropy_cpu.h"
#include "batch_entropy_dtype.h"

// Everything below is internal to one translation unit (inlined, never passed across the
// ISA boundary), so the ABI of 256-bit vectors in the generic build does not matter. (Not popped:
// GCC reports the warning at the end of the including file.)
#pragma GCC diagnostic ignored "-Wpsabi"

#include "batch_entropy_cpu_simd.h"
#include "batch_entropy_cpu_moments.h"
#include "batch_entropy_cpu_items.h"
#include "batch_entropy_cpu_tiles.h"
#include "batch_entropy_cpu_log1p.h"
#include "batch_entropy_cpu_forward.h"
#include "batch_entropy_cpu_backward.h"

namespace lbe {
namespace cpu {
namespace LBE_CPU_ISA {

using CpuTypes = ElementTypes<Half, BFloat16, float, double>;

inline void Forward(const ForwardArgs& args, const ParallelFor& parallel_for) {
  CpuTypes::Dispatch(
      args.dtype, [&](auto t) { ForwardTyped<typename decltype(t)::type>(args, parallel_for); }, [] {});
}

inline void Backward(const BackwardArgs& args, const ParallelFor& parallel_for) {
  CpuTypes::Dispatch(
      args.dtype, [&](auto t) { BackwardTyped<typename decltype(t)::type>(args, parallel_for); }, [] {});
}

}  // namespace LBE_CPU_ISA
}  // namespace cpu
}  // namespace lbe
