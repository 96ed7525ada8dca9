// The CPU kernels for any x86-64 (or other) processor.
#define LBE_CPU_ISA generic
#include "batch_entropy_cpu_impl.h"

namespace lbe {
namespace cpu {
void ForwardGeneric(const ForwardArgs& args, const ParallelFor& pf) { generic::Forward(args, pf); }
void BackwardGeneric(const BackwardArgs& args, const ParallelFor& pf) { generic::Backward(args, pf); }
}  // namespace cpu
}  // namespace lbe
