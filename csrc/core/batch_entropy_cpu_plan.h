// How the CPU kernels cut a group of tensors into work items. The cut depends on the shapes only,
// so results do not depend on the number of threads (bitwise repeatability).
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CPU_PLAN_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CPU_PLAN_H_

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lbe {
namespace cpu {

// Units per block: the accumulators of a block (a few arrays of this many floats) stay in L1.
constexpr int64_t kBlockUnits = 512;
// Rows per chunk: a chunk of a block (kChunkRows x kBlockUnits) stays in L2, so the second,
// centering pass over it is a cache read, and the tensor is read from memory once.
constexpr int64_t kChunkRows = 32;
// Elements per work item: large enough to amortize dispatch, small enough to balance tall
// inputs over threads.
constexpr int64_t kTargetItemElements = int64_t{1} << 16;

struct WorkItem {
  int64_t tensor;
  int64_t unit_begin, unit_end;
  int64_t row_begin, row_end;
  int64_t block;           // index of (tensor, unit block) over the whole group
  int64_t segment;         // index of this row segment within its block
  int64_t num_segments;    // row segments of this block
  int64_t partial_offset;  // where this item's partial statistics go (in elements)
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
  int64_t partial_elements = 0;                // per statistic (mean, m2)
  int64_t multi_segment_blocks = 0;
};

inline Plan MakePlan(int64_t num_tensors, const int64_t* batch, const int64_t* units) {
  Plan plan;
  plan.first_block_of_tensor.reserve(num_tensors + 1);
  for (int64_t t = 0; t < num_tensors; ++t) {
    plan.first_block_of_tensor.push_back(static_cast<int64_t>(plan.blocks.size()));
    const int64_t rows = batch[t], cols = units[t];
    const int64_t block_units = std::min(kBlockUnits, cols);
    // Rows per segment: a whole number of chunks, about kTargetItemElements elements.
    int64_t seg_rows = (kTargetItemElements / block_units + kChunkRows - 1) / kChunkRows * kChunkRows;
    seg_rows = std::max(seg_rows, kChunkRows);
    const int64_t segments = (rows + seg_rows - 1) / seg_rows;
    for (int64_t u0 = 0; u0 < cols; u0 += kBlockUnits) {
      const int64_t u1 = std::min(cols, u0 + kBlockUnits);
      BlockInfo info{t, u0, u1, static_cast<int64_t>(plan.items.size()), segments};
      const int64_t block = static_cast<int64_t>(plan.blocks.size());
      for (int64_t s = 0; s < segments; ++s) {
        const int64_t r0 = s * seg_rows, r1 = std::min(rows, r0 + seg_rows);
        plan.items.push_back(WorkItem{t, u0, u1, r0, r1, block, s, segments, plan.partial_elements});
        if (segments > 1) plan.partial_elements += u1 - u0;
      }
      if (segments > 1) ++plan.multi_segment_blocks;
      plan.blocks.push_back(info);
    }
  }
  plan.first_block_of_tensor.push_back(static_cast<int64_t>(plan.blocks.size()));
  return plan;
}

}  // namespace cpu
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CPU_PLAN_H_
