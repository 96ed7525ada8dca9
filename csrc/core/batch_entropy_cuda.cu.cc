// CUDA entry points: plan the launch on the host, enqueue the workspace set-up and one kernel.
#include "batch_entropy_cuda.h"

#include <cuda_runtime.h>

#include "batch_entropy_cuda_kernels.cuh"
#include "batch_entropy_cuda_plan.h"

namespace lbe {
namespace cuda {
namespace {

// Resident blocks per SM the register allocation must allow (read off ptxas -v for sm_80/sm_90):
// the largest count without spills. Two blocks of 256 threads with kChunkRows loads of 16 bytes
// (8 for 16-bit types, which get three blocks) keep 48-64 KB per SM in flight, over twice what an
// H100 needs to cover memory latency.
template <typename E> struct MinBlocks { static constexpr int kForward = 2, kBackward = 3; };
template <> struct MinBlocks<double> { static constexpr int kForward = 2, kBackward = 2; };
template <> struct MinBlocks<kernels::Half> { static constexpr int kForward = 3, kBackward = 3; };
template <> struct MinBlocks<kernels::BFloat16> { static constexpr int kForward = 3, kBackward = 3; };

template <typename E>
__global__ void __launch_bounds__(kThreads, MinBlocks<E>::kForward)
    ForwardKernel(const __grid_constant__ ForwardParams params) {
  __shared__ kernels::ForwardShared<E> shared;
  kernels::ForwardBlock<E>(params, shared);
}

template <typename E>
__global__ void __launch_bounds__(kThreads, MinBlocks<E>::kBackward)
    BackwardKernel(const __grid_constant__ BackwardParams params) {
  kernels::BackwardBlock<E>(params);
}

bool WorkspaceOk(const void* workspace, size_t have, size_t need) {
  if (need == 0) return true;
  return workspace != nullptr && have >= need && (reinterpret_cast<uintptr_t>(workspace) & 15u) == 0;
}

template <typename E>
cudaError_t LaunchForward(const ForwardParams& params, int64_t blocks, cudaStream_t stream) {
  ForwardKernel<E><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template <typename E>
cudaError_t LaunchBackward(const BackwardParams& params, int64_t blocks, cudaStream_t stream) {
  BackwardKernel<E><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

size_t ForwardWorkspaceBytes(const ForwardArgs& args) {
  ForwardPlan plan;
  if (!MakeForwardPlan(args, GetTuning(), &plan).empty()) return 0;
  return plan.workspace_bytes;
}

size_t BackwardWorkspaceBytes(const BackwardArgs& args) {
  BackwardPlan plan;
  if (!MakeBackwardPlan(args, GetTuning(), &plan).empty()) return 0;
  return plan.workspace_bytes;
}

cudaError_t Forward(const ForwardArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  ForwardPlan plan;
  if (!MakeForwardPlan(args, GetTuning(), &plan).empty()) return cudaErrorInvalidValue;
  if (args.num_tensors == 0) return cudaSuccess;
  if (!WorkspaceOk(workspace, workspace_bytes, plan.workspace_bytes)) return cudaErrorInvalidValue;
  (void)cudaGetLastError();  // an earlier, unrelated error must not be reported as ours
  char* ws = static_cast<char*>(workspace);
  if (plan.counters_bytes > 0) {
    const cudaError_t err = cudaMemsetAsync(ws + plan.counters_offset, 0, plan.counters_bytes, stream);
    if (err != cudaSuccess) return err;
  }
  if (plan.table_bytes > 0) {
    // From pageable memory: the runtime stages the bytes before returning, so `plan` may go.
    const cudaError_t err = cudaMemcpyAsync(ws + plan.table_offset, plan.tensors.data(), plan.table_bytes,
                                            cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) return err;
  }
  const ForwardParams params = MakeForwardParams(plan, args, workspace);
  return kernels::KernelTypes::Dispatch(
      args.dtype, [&](auto t) { return LaunchForward<typename decltype(t)::type>(params, plan.num_items, stream); },
      [] { return cudaErrorInvalidValue; });
}

cudaError_t Backward(const BackwardArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  BackwardPlan plan;
  if (!MakeBackwardPlan(args, GetTuning(), &plan).empty()) return cudaErrorInvalidValue;
  if (args.num_tensors == 0) return cudaSuccess;
  if (!WorkspaceOk(workspace, workspace_bytes, plan.workspace_bytes)) return cudaErrorInvalidValue;
  (void)cudaGetLastError();
  if (plan.table_bytes > 0) {
    const cudaError_t err = cudaMemcpyAsync(static_cast<char*>(workspace) + plan.table_offset, plan.tensors.data(),
                                            plan.table_bytes, cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) return err;
  }
  const BackwardParams params = MakeBackwardParams(plan, args, workspace);
  return kernels::KernelTypes::Dispatch(
      args.dtype, [&](auto t) { return LaunchBackward<typename decltype(t)::type>(params, plan.num_items, stream); },
      [] { return cudaErrorInvalidValue; });
}

}  // namespace cuda
}  // namespace lbe
