// CPU kernels of the Lbe>* ops: the core's CPU kernels on TensorFlow's intra-op thread pool.
#include "batch_entropy_kernels.h"

#include "batch_entropy_cpu.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/util/work_sharder.h"

namespace lbe_tf {
namespace {

lbe::cpu::ParallelFor IntraOpParallelFor(tensorflow::OpKernelContext* ctx) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t num_items, int64_t cost_per_item,
                const std::function<void(int64_t, int64_t)>& body) {
    if (num_items <= 0) return;
    if (num_items == 1) {
      body(0, 1);
      return;
    }
    pool->ParallelFor(num_items, cost_per_item, body);
  };
}

absl::Status ToStatus(const std::string& error) {
  if (error.empty()) return absl::OkStatus();
  return tensorflow::errors::InvalidArgument(error);
}

}  // namespace

template <>
absl::Status Launcher<CpuDevice>::Forward(tensorflow::OpKernelContext* ctx,
                                          const lbe::ForwardArgs& args) {
  return ToStatus(lbe::cpu::Forward(args, IntraOpParallelFor(ctx)));
}

template <>
absl::Status Launcher<CpuDevice>::Backward(tensorflow::OpKernelContext* ctx,
                                           const lbe::BackwardArgs& args) {
  return ToStatus(lbe::cpu::Backward(args, IntraOpParallelFor(ctx)));
}

LBE_REGISTER_ALL_KERNELS(tensorflow::DEVICE_CPU, CpuDevice);

}  // namespace lbe_tf
