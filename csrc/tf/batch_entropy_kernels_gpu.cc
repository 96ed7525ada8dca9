// GPU kernels of the Lbe>* ops: the core's CUDA kernels on the op's TensorFlow stream.
// Compiled by the host compiler (no device code here) when CMake finds nvcc; the kernels are in
// lbe_core_cuda, linked with a static cudart so the library still loads on tensorflow-cpu, where
// these registrations are simply never used.
#include <cuda_runtime_api.h>

#include "batch_entropy_cuda.h"
#include "batch_entropy_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "xla/stream_executor/stream.h"

namespace lbe_tf {
namespace {

absl::Status StreamOf(tensorflow::OpKernelContext* ctx, cudaStream_t* stream) {
  tensorflow::DeviceContext* device_context = ctx->op_device_context();
  stream_executor::Stream* se_stream = device_context ? device_context->stream() : nullptr;
  if (se_stream == nullptr) return tensorflow::errors::Internal("Lbe>* GPU kernel: no GPU stream for this op");
  void* handle = se_stream->platform_specific_handle().stream;
  if (handle == nullptr) return tensorflow::errors::Internal("Lbe>* GPU kernel: the stream has no CUDA handle");
  *stream = static_cast<cudaStream_t>(handle);
  return absl::OkStatus();
}

absl::Status ToStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  if (err == cudaErrorInvalidValue)
    return tensorflow::errors::InvalidArgument(what, ": invalid arguments for the CUDA kernel (",
                                               cudaGetErrorString(err), ")");
  return tensorflow::errors::Internal(what, " failed: ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

// Runs the core's forward or backward on the op's stream with a scratch tensor of the bytes it
// needs.
template <typename Args, typename WorkspaceBytes, typename Launch>
absl::Status LaunchOnStream(tensorflow::OpKernelContext* ctx, const Args& args,
                            WorkspaceBytes workspace_bytes, Launch launch, const char* what) {
  cudaStream_t stream = nullptr;
  TF_RETURN_IF_ERROR(StreamOf(ctx, &stream));
  const size_t bytes = workspace_bytes(args);
  tensorflow::Tensor scratch;
  void* workspace = nullptr;
  if (bytes > 0) {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT8,
                                          tensorflow::TensorShape({static_cast<int64_t>(bytes)}), &scratch));
    workspace = scratch.data();
  }
  return ToStatus(launch(args, workspace, bytes, stream), what);
}

}  // namespace

template <>
absl::Status Launcher<GpuDevice>::Forward(tensorflow::OpKernelContext* ctx, const lbe::ForwardArgs& args) {
  return LaunchOnStream(ctx, args, lbe::cuda::ForwardWorkspaceBytes, lbe::cuda::Forward,
                        "Lbe>BatchEntropies GPU kernel");
}

template <>
absl::Status Launcher<GpuDevice>::Backward(tensorflow::OpKernelContext* ctx, const lbe::BackwardArgs& args) {
  return LaunchOnStream(ctx, args, lbe::cuda::BackwardWorkspaceBytes, lbe::cuda::Backward,
                        "Lbe>BatchEntropiesGrad GPU kernel");
}

template <>
absl::Status Launcher<GpuDevice>::Zero(tensorflow::OpKernelContext* ctx, void* ptr, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  cudaStream_t stream = nullptr;
  TF_RETURN_IF_ERROR(StreamOf(ctx, &stream));
  return ToStatus(cudaMemsetAsync(ptr, 0, bytes, stream), "Lbe>* GPU kernel: zero-filling an output");
}

template <>
absl::Status Launcher<GpuDevice>::Copy(tensorflow::OpKernelContext* ctx, void* dst, const void* src,
                                       size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  cudaStream_t stream = nullptr;
  TF_RETURN_IF_ERROR(StreamOf(ctx, &stream));
  return ToStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream),
                  "Lbe>* GPU kernel: copying entropies");
}

LBE_REGISTER_ALL_KERNELS(tensorflow::DEVICE_GPU, GpuDevice);

}  // namespace lbe_tf
