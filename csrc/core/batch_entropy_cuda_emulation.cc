// Host emulation of the CUDA kernels: see batch_entropy_cuda_emulation.h.
#include "batch_entropy_cuda_emulation.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

#include "batch_entropy_cuda_kernels.cuh"

namespace lbe {
namespace cuda {
namespace emulation {
namespace {

struct Range {
  uintptr_t begin, end;
  bool writable;
  const char* name;
};

// Runs the threads of one block as fibers on the calling thread.
class FiberBlock {
 public:
  static constexpr size_t kStackBytes = 128 * 1024;

  FiberBlock() : stacks_(new char[static_cast<size_t>(kThreads) * kStackBytes]) {}

  // Runs body(tid) for every thread; returns "" or what went wrong with the barriers.
  std::string Run(const std::function<void(int)>& body) {
    body_ = &body;
    for (int i = 0; i < kThreads; ++i) {
      getcontext(&contexts_[i]);
      contexts_[i].uc_stack.ss_sp = stacks_.get() + static_cast<size_t>(i) * kStackBytes;
      contexts_[i].uc_stack.ss_size = kStackBytes;
      contexts_[i].uc_link = &scheduler_;
      makecontext(&contexts_[i], &FiberBlock::Entry, 0);
      state_[i] = kReady;
    }
    while (true) {
      for (int i = 0; i < kThreads; ++i) {
        if (state_[i] != kReady) continue;
        current_ = i;
        state_[i] = kRunning;
        swapcontext(&scheduler_, &contexts_[i]);
        if (state_[i] == kRunning) state_[i] = kDone;  // returned through uc_link
      }
      int done = 0, waiting = 0;
      for (int i = 0; i < kThreads; ++i) {
        done += state_[i] == kDone;
        waiting += state_[i] == kBarrier;
      }
      if (done == kThreads) return {};
      if (done > 0) {
        std::ostringstream msg;
        msg << "barrier divergence: " << done << " threads exited while " << waiting
            << " wait at __syncthreads()";
        return msg.str();
      }
      for (int i = 0; i < kThreads; ++i) state_[i] = kReady;
    }
  }

  void Barrier() {
    const int me = current_;
    state_[me] = kBarrier;
    swapcontext(&contexts_[me], &scheduler_);
  }

  int current() const { return current_; }

 private:
  enum State { kReady, kRunning, kBarrier, kDone };
  static void Entry();

  std::unique_ptr<char[]> stacks_;  // uninitialized: no need to touch 32 MB per launch
  ucontext_t scheduler_;
  ucontext_t contexts_[kThreads];
  State state_[kThreads];
  int current_ = 0;
  const std::function<void(int)>* body_ = nullptr;

  friend struct Launch;
};

// The launch in progress on this thread.
struct Launch {
  FiberBlock* block = nullptr;
  int64_t block_index = 0;
  std::vector<Range> ranges;
  std::string error;

  void Fail(const std::string& what) {
    if (!error.empty()) return;
    std::ostringstream msg;
    msg << what << " (block " << block_index << ", thread " << (block ? block->current() : -1) << ")";
    error = msg.str();
  }
};

thread_local Launch* current_launch = nullptr;

void FiberBlock::Entry() {
  FiberBlock* self = current_launch->block;
  (*self->body_)(self->current_);
}

}  // namespace

int ThreadIndex() { return current_launch->block->current(); }
int64_t BlockIndex() { return current_launch->block_index; }
void SyncThreads() { current_launch->block->Barrier(); }
void ThreadFence() {}
unsigned AtomicAdd(unsigned* p, unsigned v) {
  CheckAccess(p, sizeof(unsigned), true);
  const unsigned old = *p;
  *p = old + v;
  return old;
}

void CheckAccess(const void* p, size_t bytes, bool write) {
  Launch* launch = current_launch;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p), end = begin + bytes;
  for (const Range& r : launch->ranges) {
    if (begin >= r.begin && end <= r.end) {
      if (write && !r.writable) launch->Fail(std::string("write to the input array ") + r.name);
      return;
    }
  }
  std::ostringstream msg;
  msg << (write ? "out-of-bounds write" : "out-of-bounds read") << " of " << bytes << " bytes at " << p;
  launch->Fail(msg.str());
}

void CheckAligned(const void* p, size_t alignment) {
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0) current_launch->Fail("misaligned vector access");
}

namespace {

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

class Emulator {
 public:
  explicit Emulator(const Options& options) : options_(options), fibers_(new FiberBlock) {
    launch_.block = fibers_.get();
    current_launch = &launch_;
  }
  ~Emulator() { current_launch = nullptr; }

  void AddRange(const void* p, size_t bytes, bool writable, const char* name) {
    if (p == nullptr || bytes == 0) return;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
    launch_.ranges.push_back(Range{begin, begin + bytes, writable, name});
  }

  // Workspace filled with NaN bytes (0xff), as a fresh device allocation would hold garbage.
  char* AllocateWorkspace(size_t bytes) {
    if (bytes == 0) return nullptr;
    workspace_.reset(static_cast<char*>(std::aligned_alloc(kWorkspaceAlignment, AlignUp(bytes))));
    std::memset(workspace_.get(), 0xff, bytes);
    AddRange(workspace_.get(), bytes, true, "workspace");
    return workspace_.get();
  }

  // Runs body for each block in the chosen order; returns "" or the first error.
  template <typename Shared>
  std::string RunGrid(int64_t num_blocks, const std::function<void(Shared&)>& body) {
    std::vector<int64_t> order(static_cast<size_t>(num_blocks));
    std::iota(order.begin(), order.end(), 0);
    if (options_.block_order == 1) std::reverse(order.begin(), order.end());
    if (options_.block_order == 2) {
      std::mt19937_64 rng(options_.seed);
      std::shuffle(order.begin(), order.end(), rng);
    }
    std::unique_ptr<Shared> shared(new Shared);
    for (int64_t b : order) {
      std::memset(static_cast<void*>(shared.get()), 0xff, sizeof(Shared));
      launch_.block_index = b;
      const std::function<void(int)> thread_body = [&](int) { body(*shared); };
      const std::string barrier_error = fibers_->Run(thread_body);
      if (!barrier_error.empty()) launch_.Fail(barrier_error);
      if (!launch_.error.empty()) return launch_.error;
    }
    return {};
  }

 private:
  Options options_;
  std::unique_ptr<FiberBlock> fibers_;  // large (256 contexts): on the heap
  Launch launch_;
  std::unique_ptr<char, AlignedFree> workspace_;
};

template <typename E>
Report ForwardTyped(const ForwardArgs& args, const ForwardPlan& plan, const Options& options) {
  Report report;
  report.workspace_bytes = plan.workspace_bytes;
  report.num_items = plan.num_items;
  Emulator emulator(options);
  const int elem = DTypeSize(args.dtype), stats = StatsSize(args.dtype);
  for (int64_t i = 0; i < args.num_tensors; ++i) {
    emulator.AddRange(args.x[i], static_cast<size_t>(args.batch[i] * args.units[i] * elem), false, "x");
    emulator.AddRange(args.mean[i], static_cast<size_t>(args.units[i] * stats), true, "mean");
    emulator.AddRange(args.variance[i], static_cast<size_t>(args.units[i] * stats), true, "variance");
    if (args.mean_residual && args.mean_residual[i])
      emulator.AddRange(args.mean_residual[i], static_cast<size_t>(args.units[i] * stats), true, "mean_residual");
  }
  emulator.AddRange(args.entropy, static_cast<size_t>(args.num_tensors * elem), true, "entropy");
  char* ws = emulator.AllocateWorkspace(plan.workspace_bytes);
  // What Forward() enqueues before the kernel: zeroed counters and the descriptor table.
  if (plan.counters_bytes > 0) std::memset(ws + plan.counters_offset, 0, plan.counters_bytes);
  if (plan.table_bytes > 0) std::memcpy(ws + plan.table_offset, plan.tensors.data(), plan.table_bytes);
  const ForwardParams params = MakeForwardParams(plan, args, ws);
  report.kernel_launches = 1;
  report.error = emulator.RunGrid<kernels::ForwardShared<E>>(
      plan.num_items, [&](kernels::ForwardShared<E>& sm) { kernels::ForwardBlock<E>(params, sm); });
  return report;
}

template <typename E>
Report BackwardTyped(const BackwardArgs& args, const BackwardPlan& plan, const Options& options) {
  Report report;
  report.workspace_bytes = plan.workspace_bytes;
  report.num_items = plan.num_items;
  Emulator emulator(options);
  const int elem = DTypeSize(args.dtype), stats = StatsSize(args.dtype);
  for (int64_t i = 0; i < args.num_tensors; ++i) {
    const size_t x_bytes = static_cast<size_t>(args.batch[i] * args.units[i] * elem);
    const size_t s_bytes = static_cast<size_t>(args.units[i] * stats);
    emulator.AddRange(args.x[i], x_bytes, false, "x");
    emulator.AddRange(args.dx[i], x_bytes, true, "dx");
    emulator.AddRange(args.mean[i], s_bytes, false, "mean");
    emulator.AddRange(args.variance[i], s_bytes, false, "variance");
    if (args.grad_mean) emulator.AddRange(args.grad_mean[i], s_bytes, false, "grad_mean");
    if (args.grad_variance) emulator.AddRange(args.grad_variance[i], s_bytes, false, "grad_variance");
    if (args.mean_residual) emulator.AddRange(args.mean_residual[i], s_bytes, false, "mean_residual");
  }
  emulator.AddRange(args.grad_entropy, static_cast<size_t>(args.num_tensors * elem), false, "grad_entropy");
  char* ws = emulator.AllocateWorkspace(plan.workspace_bytes);
  if (plan.table_bytes > 0) std::memcpy(ws + plan.table_offset, plan.tensors.data(), plan.table_bytes);
  const BackwardParams params = MakeBackwardParams(plan, args, ws);
  struct NoShared {};
  report.kernel_launches = 1;
  report.error = emulator.RunGrid<NoShared>(plan.num_items,
                                            [&](NoShared&) { kernels::BackwardBlock<E>(params); });
  return report;
}

}  // namespace

Report Forward(const ForwardArgs& args, const Tuning& tuning, const Options& options) {
  ForwardPlan plan;
  Report report;
  report.error = MakeForwardPlan(args, tuning, &plan);
  if (!report.error.empty() || args.num_tensors == 0) return report;
  return kernels::KernelTypes::Dispatch(
      args.dtype, [&](auto t) { return ForwardTyped<typename decltype(t)::type>(args, plan, options); },
      [&] {
        report.error = "unknown dtype";
        return report;
      });
}

Report Backward(const BackwardArgs& args, const Tuning& tuning, const Options& options) {
  BackwardPlan plan;
  Report report;
  report.error = MakeBackwardPlan(args, tuning, &plan);
  if (!report.error.empty() || args.num_tensors == 0) return report;
  return kernels::KernelTypes::Dispatch(
      args.dtype, [&](auto t) { return BackwardTyped<typename decltype(t)::type>(args, plan, options); },
      [&] {
        report.error = "unknown dtype";
        return report;
      });
}

}  // namespace emulation
}  // namespace cuda
}  // namespace lbe
