// CPU kernels of the Lbe>* ops: the core's CPU kernels on TensorFlow's intra-op thread pool.
#include "batch_entropy_kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdint>
#include <cstring>

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

// TensorFlow's default CPU allocator hands out large buffers as fresh mappings, so the first write
// to each 4 KiB page of a large gradient is a page fault: for a [1024, 4096] float32 gradient some
// 4096 of them, which cost more than the kernel's arithmetic. Asking for transparent huge pages on
// the buffer's 2 MiB-aligned interior (before the first write) turns that into a fault per 2 MiB
// where the kernel allows it (THP "madvise" or "always"). Only advice: memory already mapped with
// small pages, or a kernel without THP, is left as it is, and any error is ignored.
constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
constexpr int64_t kHugePageAdviceBytes = int64_t{8} << 20;

void AdviseHugePages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kHugePageAdviceBytes) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) &
                        ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
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
  for (int64_t t = 0; t < args.num_tensors; ++t) {
    AdviseHugePages(args.dx[t], args.batch[t] * args.units[t] * lbe::DTypeSize(args.dtype));
  }
  return ToStatus(lbe::cpu::Backward(args, IntraOpParallelFor(ctx)));
}

template <>
absl::Status Launcher<CpuDevice>::Zero(tensorflow::OpKernelContext*, void* ptr, size_t bytes) {
  if (bytes > 0) std::memset(ptr, 0, bytes);
  return absl::OkStatus();
}

template <>
absl::Status Launcher<CpuDevice>::Copy(tensorflow::OpKernelContext*, void* dst, const void* src,
                                       size_t bytes) {
  if (bytes > 0) std::memcpy(dst, src, bytes);
  return absl::OkStatus();
}

LBE_REGISTER_ALL_KERNELS(tensorflow::DEVICE_CPU, CpuDevice);

}  // namespace lbe_tf
