// How the CPU kernels cut a group of tensors into work items, and the work items into shards for
// the thread pool. Both cuts depend on the shapes only, and every item writes its own outputs, so
// results do not depend on the number of threads or on which thread runs what (bitwise
// repeatability).
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CPU_PLAN_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CPU_PLAN_H_

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lbe {
namespace cpu {

// Rows per chunk of the forward pass: a chunk of a forward block (kChunkRows x
// kForwardBlockUnits, 128 KiB in float32) stays in L2, so the second, centering pass over it is a
// cache read and the tensor is read from memory once.
constexpr int64_t kChunkRows = 32;
// Units per forward block: the block's accumulators (a few arrays of this many floats) stay in L1.
// Rows are read front to back inside a block, so wide blocks also keep the hardware prefetcher
// streaming.
constexpr int64_t kForwardBlockUnits = 1024;
// Units per backward block: the per-unit scale and shift (two arrays of this many) stay in L1/L2;
// with units up to this many an item is a run of whole rows, one contiguous stream in and out.
constexpr int64_t kBackwardBlockUnits = 8192;
// Elements per work item: large enough that per-item work (setup, merges) is noise, small enough
// to balance tall inputs over threads.
constexpr int64_t kTargetItemElements = int64_t{1} << 17;
// Elements per shard handed to the thread pool: a shard is a run of consecutive items (many small
// tensors of a group share one). A group with fewer elements than two shards runs on the calling
// thread: waking the pool would cost more than the work.
constexpr int64_t kShardElements = int64_t{1} << 16;

struct WorkItem {
  int64_t tensor;
  int64_t unit_begin, unit_end;
  int64_t row_begin, row_end;
  int64_t block;           // index of (tensor, unit block) over the whole group
  int64_t segment;         // index of this row segment within its block
  int64_t num_segments;    // row segments of this block
  int64_t partial_offset;  // where this item's partial statistics go (in elements)
  int64_t Elements() const { return (unit_end - unit_begin) * (row_end - row_begin); }
};

struct BlockInfo {
  int64_t tensor;
  int64_t unit_begin, unit_end;
  int64_t first_item;
  int64_t num_segments;
};

struct Plan {
  std::vector<WorkItem> items;
  std::vector<BlockInfo> blocks;
  std::vector<int64_t> first_block_of_tensor;  // num_tensors + 1 entries
  std::vector<int64_t> shard_begin;            // num_shards + 1 entries, item indices
  int64_t partial_elements = 0;                // per statistic (mean, m2)
  int64_t multi_segment_blocks = 0;
  int64_t total_elements = 0;
  int64_t max_block_units = 0;
  int64_t NumShards() const { return static_cast<int64_t>(shard_begin.size()) - 1; }
};

// Cuts each tensor into blocks of at most block_units units and each block into row segments of
// about target_elements elements (a multiple of row_multiple rows), then groups consecutive items
// into shards of about kShardElements elements.
inline Plan MakePlan(int64_t num_tensors, const int64_t* batch, const int64_t* units,
                     int64_t block_units, int64_t row_multiple) {
  struct Cut {
    int64_t width, num_blocks, seg_rows, segments;
  };
  auto cut = [&](int64_t t) {
    const int64_t rows = batch[t], cols = units[t];
    Cut c;
    // Blocks of equal width (at most block_units), so no block is a sliver.
    c.num_blocks = (cols + block_units - 1) / block_units;
    c.width = (cols + c.num_blocks - 1) / c.num_blocks;
    c.seg_rows = std::max(row_multiple, (kTargetItemElements / c.width + row_multiple - 1) /
                                            row_multiple * row_multiple);
    c.segments = (rows + c.seg_rows - 1) / c.seg_rows;
    return c;
  };
  Plan plan;
  int64_t num_items = 0, num_blocks = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    const Cut c = cut(t);
    num_blocks += c.num_blocks;
    num_items += c.num_blocks * c.segments;
  }
  plan.items.reserve(num_items);
  plan.blocks.reserve(num_blocks);
  plan.first_block_of_tensor.reserve(num_tensors + 1);
  for (int64_t t = 0; t < num_tensors; ++t) {
    plan.first_block_of_tensor.push_back(static_cast<int64_t>(plan.blocks.size()));
    const int64_t rows = batch[t], cols = units[t];
    const Cut c = cut(t);
    plan.max_block_units = std::max(plan.max_block_units, c.width);
    for (int64_t u0 = 0; u0 < cols; u0 += c.width) {
      const int64_t u1 = std::min(cols, u0 + c.width);
      const int64_t block = static_cast<int64_t>(plan.blocks.size());
      plan.blocks.push_back(BlockInfo{t, u0, u1, static_cast<int64_t>(plan.items.size()), c.segments});
      for (int64_t s = 0; s < c.segments; ++s) {
        const int64_t r0 = s * c.seg_rows, r1 = std::min(rows, r0 + c.seg_rows);
        plan.items.push_back(
            WorkItem{t, u0, u1, r0, r1, block, s, c.segments, plan.partial_elements});
        if (c.segments > 1) plan.partial_elements += u1 - u0;
      }
      if (c.segments > 1) ++plan.multi_segment_blocks;
    }
    plan.total_elements += rows * cols;
  }
  plan.first_block_of_tensor.push_back(static_cast<int64_t>(plan.blocks.size()));

  plan.shard_begin.push_back(0);
  if (plan.total_elements >= 2 * kShardElements) {
    int64_t filled = 0;
    for (size_t i = 0; i < plan.items.size(); ++i) {
      filled += plan.items[i].Elements();
      if (filled >= kShardElements && i + 1 < plan.items.size()) {
        plan.shard_begin.push_back(static_cast<int64_t>(i) + 1);
        filled = 0;
      }
    }
  }
  plan.shard_begin.push_back(static_cast<int64_t>(plan.items.size()));
  return plan;
}

}  // namespace cpu
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CPU_PLAN_H_
