// The CPU kernels compiled for AVX2 + FMA + F16C (set for this file alone by CMake), used when
// the processor has them.
#define LBE_CPU_ISA avx2
#include "batch_entropy_cpu_impl.h"

namespace lbe {
namespace cpu {
void ForwardAvx2(const ForwardArgs& args, const ParallelFor& pf) { avx2::Forward(args, pf); }
void BackwardAvx2(const BackwardArgs& args, const ParallelFor& pf) { avx2::Backward(args, pf); }
}  // namespace cpu
}  // namespace lbe
