// Part of the CPU kernel bodies, compiled once per instruction set inside the namespace that
// LBE_CPU_ISA names; included through batch_entropy_cpu_impl.h only. This part: running the
// work items of a plan on the thread pool and prefetching the next one.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CPU_ITEMS_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CPU_ITEMS_H_

#include <algorithm>
#include <cstdint>

#include "batch_entropy_cpu.h"
#include "batch_entropy_cpu_plan.h"

namespace lbe {
namespace cpu {
namespace LBE_CPU_ISA {

// Walks the memory of the next work item with prefetch hints while the current one computes, a
// few cache lines per step, so that the next item is in cache when its turn comes. Groups of small
// tensors (a deep network's activations) live in separate allocations, where the hardware
// prefetcher starts afresh at every tensor and every page; large items stream well without help,
// so only their first lines are touched. Reads are fetched into L2 (prefetcht1), not L1: from
// memory, L1 prefetches of a whole small tensor leave the loop waiting on their misses.
class ItemPrefetcher {
 public:
  static constexpr int64_t kMaxBytes = int64_t{1} << 17;  // whole items up to this size

  ItemPrefetcher() = default;
  template <typename T>
  ItemPrefetcher(const void* data, int64_t cols, const WorkItem& item, bool write, T /*type*/)
      : write_(write) {
    const int64_t size = static_cast<int64_t>(sizeof(T));
    base_ = static_cast<const char*>(data) + (item.row_begin * cols + item.unit_begin) * size;
    const int64_t width = item.unit_end - item.unit_begin;
    const int64_t rows = item.row_end - item.row_begin;
    if (width == cols) {  // a run of whole rows: one contiguous range
      rows_ = 1;
      row_bytes_ = rows * width * size;
    } else {
      rows_ = rows;
      row_bytes_ = width * size;
      stride_ = cols * size;
    }
    if (rows_ * row_bytes_ > kMaxBytes) {  // the hardware prefetcher takes over after the start
      rows_ = std::min<int64_t>(rows_, 8);
      row_bytes_ = std::min<int64_t>(row_bytes_, 512);
    }
    lines_ = rows_ * ((row_bytes_ + 63) / 64);
  }
  int64_t Lines() const { return lines_; }
  void Advance(int64_t lines) {
    for (; lines > 0 && row_ < rows_; --lines) {
      const char* p = base_ + row_ * stride_ + offset_;
      if (write_) __builtin_prefetch(p, 1, 3);
      else __builtin_prefetch(p, 0, 2);
      offset_ += 64;
      if (offset_ >= row_bytes_) {
        offset_ = 0;
        ++row_;
      }
    }
  }

 private:
  const char* base_ = nullptr;
  int64_t stride_ = 0, row_bytes_ = 0, rows_ = 0, lines_ = 0;
  int64_t row_ = 0, offset_ = 0;
  bool write_ = false;
};

// Runs fn(item) for every item of the plan, shard by shard on the thread pool; a plan of one shard
// runs on the calling thread.
template <typename Fn>
void RunItems(const Plan& plan, const ParallelFor& parallel_for, int64_t cost_per_element,
              const Fn& fn) {
  const int64_t shards = plan.NumShards();
  auto run_shards = [&](int64_t begin, int64_t end) {
    for (int64_t i = plan.shard_begin[begin]; i < plan.shard_begin[end]; ++i) fn(i);
  };
  if (shards <= 1) {
    run_shards(0, shards);
    return;
  }
  parallel_for(shards, kShardElements * cost_per_element, run_shards);
}

}  // namespace LBE_CPU_ISA
}  // namespace cpu
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CPU_ITEMS_H_
