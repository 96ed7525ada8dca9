// CUDA kernels for batch entropy, forward and backward, for one tensor or a group of tensors in
// one launch. Framework-free: the caller passes the stream and device scratch memory, and gets a
// cudaError_t back. See batch_entropy_cuda_kernels.cuh for how the kernels work.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CUDA_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstddef>

#include "batch_entropy_common.h"

namespace lbe {
namespace cuda {

// Bytes of device scratch a call needs (zero-initialized counters, partial moments of split
// batches, the descriptor table of groups larger than the kernel parameters hold). Depends on the
// shapes, dtype and pointer alignment only; 0 means the call needs no workspace.
size_t ForwardWorkspaceBytes(const ForwardArgs& args);
size_t BackwardWorkspaceBytes(const BackwardArgs& args);

// Enqueue on `stream`. Data pointers are device pointers, descriptor arrays are host arrays (read
// before the call returns). The workspace must be 16-byte aligned device memory of at least the
// bytes above, and not used by anything else until the enqueued work is done. Returns
// cudaSuccess or the first error; invalid arguments give cudaErrorInvalidValue. Deterministic:
// the same inputs give the same bits, on any GPU (the work is cut by shapes, not by device).
cudaError_t Forward(const ForwardArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);
cudaError_t Backward(const BackwardArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Number of kernel launches (and other stream operations) of the last call is at most 3 for
// Forward (memset of counters, table copy, kernel) and 2 for Backward (table copy, kernel).

}  // namespace cuda
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CUDA_H_
