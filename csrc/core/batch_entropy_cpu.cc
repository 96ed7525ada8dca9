#include "batch_entropy_cpu.h"

#include <cstdlib>
#include <cstring>

namespace lbe {
namespace cpu {

void ForwardGeneric(const ForwardArgs& args, const ParallelFor& pf);
void BackwardGeneric(const BackwardArgs& args, const ParallelFor& pf);
#if defined(LBE_OPS_HAVE_AVX2)
void ForwardAvx2(const ForwardArgs& args, const ParallelFor& pf);
void BackwardAvx2(const BackwardArgs& args, const ParallelFor& pf);
#endif

namespace {

// LBE_OPS_CPU_ISA=generic forces the portable kernels (to test them on an AVX2 machine).
bool UseAvx2() {
#if defined(LBE_OPS_HAVE_AVX2)
  static const bool supported = [] {
    const char* forced = std::getenv("LBE_OPS_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "generic") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return supported;
#else
  return false;
#endif
}

}  // namespace

ParallelFor SerialFor() {
  return [](int64_t num_items, int64_t, const std::function<void(int64_t, int64_t)>& body) {
    if (num_items > 0) body(0, num_items);
  };
}

const char* IsaName() { return UseAvx2() ? "avx2" : "generic"; }

std::string Forward(const ForwardArgs& args, const ParallelFor& parallel_for) {
  if (const char* error = ValidateArgs(args)) return error;
  if (args.num_tensors > 0 && (args.mean == nullptr || args.variance == nullptr || args.entropy == nullptr))
    return "output arrays must not be null";
#if defined(LBE_OPS_HAVE_AVX2)
  if (UseAvx2()) {
    ForwardAvx2(args, parallel_for);
    return {};
  }
#endif
  ForwardGeneric(args, parallel_for);
  return {};
}

std::string Backward(const BackwardArgs& args, const ParallelFor& parallel_for) {
  if (const char* error = ValidateArgs(args)) return error;
  if (args.num_tensors > 0 && (args.mean == nullptr || args.variance == nullptr ||
                               args.grad_entropy == nullptr || args.dx == nullptr))
    return "input and output arrays must not be null";
#if defined(LBE_OPS_HAVE_AVX2)
  if (UseAvx2()) {
    BackwardAvx2(args, parallel_for);
    return {};
  }
#endif
  BackwardGeneric(args, parallel_for);
  return {};
}

}  // namespace cpu
}  // namespace lbe
