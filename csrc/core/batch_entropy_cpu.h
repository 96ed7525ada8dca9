// CPU kernels for batch entropy, forward and backward, for one tensor or a group of tensors.
// Framework-free: the caller supplies a parallel-for (TensorFlow's intra-op pool, or a serial
// loop). Results are bitwise repeatable: the work is cut into items from the shapes alone, never
// from the number of threads, and partial results are merged in a fixed order.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CPU_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CPU_H_

#include <cstdint>
#include <functional>
#include <string>

#include "batch_entropy_common.h"

namespace lbe {
namespace cpu {

// Calls body(begin, end) over disjoint ranges covering [0, num_items), possibly from several
// threads at once. cost_per_item is a rough count of element reads per item, for sharding.
using ParallelFor = std::function<void(int64_t num_items, int64_t cost_per_item,
                                       const std::function<void(int64_t, int64_t)>& body)>;

// A ParallelFor that runs everything on the calling thread.
ParallelFor SerialFor();

// Both return an empty string on success, else what was wrong with the arguments.
std::string Forward(const ForwardArgs& args, const ParallelFor& parallel_for);
std::string Backward(const BackwardArgs& args, const ParallelFor& parallel_for);

// Which instruction set the kernels dispatch to on this machine ("avx2" or "generic").
const char* IsaName();

}  // namespace cpu
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CPU_H_
