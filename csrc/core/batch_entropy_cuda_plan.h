// How the CUDA kernels cut a group of tensors into work items, and the descriptors they read.
// Plain C++ (no CUDA headers): the same plan drives the real launches (batch_entropy_cuda.cu.cc)
// and the host emulation of the kernels (batch_entropy_cuda_emulation.cc).
//
// A work item is one thread block: one tile of units of one tensor over one split of its batch.
// Each thread owns `vec` adjacent units (one vector access of VectorBytes() where the row
// stride and the pointer allow it, else a single unit) and the threads of a block are
// laid out as [row_lanes][threads_per_row], so every load instruction of a warp reads contiguous
// memory. The cut depends on the shapes, dtype and pointer alignment only, never on the device,
// so results are bitwise repeatable on any GPU the code runs on.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CUDA_PLAN_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CUDA_PLAN_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "batch_entropy_common.h"

namespace lbe {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kLog2Threads = 8;
// Rows a thread loads before it reduces them: kChunkRows independent vector loads in flight per
// thread, and an exact two-pass mean/M2 over the chunk in registers.
constexpr int kChunkRows = 8;
// Groups of up to this many tensors pass their descriptors as kernel parameters (no copy);
// larger groups copy a descriptor table into the workspace.
constexpr int kInlineTensors = 24;
constexpr size_t kWorkspaceAlignment = 256;

// Knobs of the cut, for benchmarking. The defaults are what the library uses.
struct Tuning {
  int64_t forward_target_items = 1024;   // blocks the forward pass aims for over the group
  int64_t forward_min_chunks = 2;        // full chunks per thread before the batch is split more
  int64_t forward_max_splits = 256;      // batch splits per tile (bounds the second-stage merge)
  int64_t backward_target_items = 2048;
  int64_t backward_min_chunks = 2;
  int64_t row_segment_bytes = 512;       // bytes of a row one tile spans (before widening)
};

inline std::mutex& TuningMutex() {
  static std::mutex mutex;
  return mutex;
}
inline Tuning& TuningStorage() {
  static Tuning tuning;
  return tuning;
}
inline Tuning GetTuning() {
  std::lock_guard<std::mutex> lock(TuningMutex());
  return TuningStorage();
}
inline std::string SetTuning(const Tuning& tuning) {
  if (tuning.forward_target_items < 1 || tuning.forward_min_chunks < 1 ||
      tuning.forward_max_splits < 1 || tuning.backward_target_items < 1 ||
      tuning.backward_min_chunks < 1 || tuning.row_segment_bytes < 16)
    return "tuning values must be positive (row_segment_bytes >= 16)";
  std::lock_guard<std::mutex> lock(TuningMutex());
  TuningStorage() = tuning;
  return {};
}

// Descriptor of one tensor for the forward kernel.
struct ForwardTensor {
  const void* x;
  void* mean;
  void* variance;
  void* mean_residual;      // may be null: not written
  int64_t batch;
  int64_t units;
  int64_t rows_per_split;
  int64_t partial_offset;   // stats-type elements into the partials area (splits > 1 only)
  int64_t tile_begin;       // index of this tensor's first tile in the group (counters, sums)
  int32_t item_begin;       // first block of this tensor
  int32_t tiles;
  int32_t splits;
  int32_t log2_threads_per_row;
  int32_t vectorized;       // 1: vectors of VectorWidth() units; 0: one unit per thread
  int32_t pad;
};

struct ForwardParams {
  const ForwardTensor* table;   // device copy when num_tensors > kInlineTensors
  void* entropy;                // [num_tensors], input dtype
  unsigned* tile_counters;      // [total tiles], zeroed before the launch
  unsigned* tensor_counters;    // [num_tensors], zeroed before the launch
  double* tile_entropy;         // [total tiles]: sum of H_j over a tile
  void* partials;               // per (tile, split): mean[tile_units], m2[tile_units]
  int64_t ddof;
  int32_t num_tensors;
  int32_t num_items;
  ForwardTensor inline_table[kInlineTensors];
};

struct BackwardTensor {
  const void* x;
  void* dx;
  const void* mean;
  const void* variance;
  const void* grad_mean;        // may be null: zero
  const void* grad_variance;    // may be null: zero
  const void* mean_residual;    // may be null: zero
  int64_t batch;
  int64_t units;
  int64_t rows_per_split;
  double entropy_factor;        // pi*e / (U * (B - ddof))
  double variance_factor;       // 2 / (B - ddof)
  double mean_factor;           // 1 / B
  int32_t item_begin;
  int32_t splits;
  int32_t log2_threads_per_row;
  int32_t vectorized;
};

struct BackwardParams {
  const BackwardTensor* table;
  const void* grad_entropy;     // [num_tensors], input dtype
  int64_t ddof;
  int32_t num_tensors;
  int32_t num_items;
  BackwardTensor inline_table[kInlineTensors];
};

static_assert(sizeof(ForwardParams) <= 4096, "kernel parameters are limited to 4 KB");
static_assert(sizeof(BackwardParams) <= 4096, "kernel parameters are limited to 4 KB");

struct Geometry {
  int vec = 1;                  // units per thread
  int log2_threads_per_row = 0;
  int64_t tile_units = 1;       // vec << log2_threads_per_row
  int64_t tiles = 1;
  int64_t splits = 1;
  int64_t rows_per_split = 1;
};

// Bytes per vector access: 16, except 8 for 16-bit types, whose 16-byte vectors would hold 8
// units' running state per thread (too many registers); 8 bytes x kChunkRows rows in flight
// per thread is still plenty.
inline int VectorBytes(DType dtype) { return DTypeSize(dtype) == 2 ? 8 : 16; }
inline int VectorWidth(DType dtype) { return VectorBytes(dtype) / DTypeSize(dtype); }

inline bool Aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Tile shape for a [batch, units] tensor: threads across a row cover up to row_segment_bytes,
// and are widened (fewer row lanes) while a short batch would leave row lanes without a full
// chunk of rows.
inline Geometry TileShape(int elem_bytes, int vec, int64_t batch, int64_t units, const Tuning& tuning) {
  Geometry g;
  g.vec = vec;
  const int64_t vectors_per_row = (units + vec - 1) / vec;
  const int64_t max_threads_per_row =
      std::max<int64_t>(1, std::min<int64_t>(kThreads, tuning.row_segment_bytes / (vec * elem_bytes)));
  int lp = 0;
  while ((int64_t{1} << lp) < vectors_per_row && (int64_t{2} << lp) <= max_threads_per_row) ++lp;
  while (lp < kLog2Threads && (int64_t{1} << lp) < vectors_per_row &&
         batch < (int64_t{kThreads} >> lp) * kChunkRows)
    ++lp;
  g.log2_threads_per_row = lp;
  g.tile_units = int64_t{vec} << lp;
  g.tiles = (units + g.tile_units - 1) / g.tile_units;
  return g;
}

// Splits of the batch: about `wanted_items` blocks for this tensor, each thread with at least
// min_chunks full chunks of rows, and every row lane with the same number of rows.
inline void ChooseSplits(Geometry* g, int64_t batch, double wanted_items, int64_t min_chunks,
                         int64_t max_splits) {
  const int64_t row_lanes = int64_t{kThreads} >> g->log2_threads_per_row;
  const int64_t min_rows = row_lanes * kChunkRows * min_chunks;
  const double per_tile = wanted_items / static_cast<double>(g->tiles);
  int64_t splits = per_tile < 1.5 ? 1 : static_cast<int64_t>(per_tile + 0.5);
  splits = std::min(splits, std::max<int64_t>(1, batch / min_rows));
  splits = std::max<int64_t>(1, std::min(splits, max_splits));
  int64_t rows = (batch + splits - 1) / splits;
  rows = (rows + row_lanes - 1) / row_lanes * row_lanes;
  g->rows_per_split = rows;
  g->splits = (batch + rows - 1) / rows;
}

inline size_t AlignUp(size_t n) { return (n + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment; }

struct ForwardPlan {
  std::vector<ForwardTensor> tensors;
  int64_t num_items = 0;
  int64_t total_tiles = 0;
  bool needs_counters = false;
  size_t counters_offset = 0, counters_bytes = 0;
  size_t tile_entropy_offset = 0;
  size_t partials_offset = 0;
  size_t table_offset = 0, table_bytes = 0;
  size_t workspace_bytes = 0;
};

struct BackwardPlan {
  std::vector<BackwardTensor> tensors;
  int64_t num_items = 0;
  size_t table_offset = 0, table_bytes = 0;
  size_t workspace_bytes = 0;
};

inline double TotalElements(int64_t n, const int64_t* batch, const int64_t* units) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(batch[i]) * static_cast<double>(units[i]);
  return total;
}

// Returns "" or what is wrong. Pointers are only looked at for their alignment.
inline std::string MakeForwardPlan(const ForwardArgs& args, const Tuning& tuning, ForwardPlan* plan) {
  if (const char* error = ValidateArgs(args)) return error;
  if (args.num_tensors > 0 && (args.mean == nullptr || args.variance == nullptr || args.entropy == nullptr))
    return "output arrays must not be null";
  if (args.num_tensors > INT32_MAX) return "too many tensors";
  const int elem = DTypeSize(args.dtype), stats = StatsSize(args.dtype);
  const double total = TotalElements(args.num_tensors, args.batch, args.units);
  plan->tensors.assign(static_cast<size_t>(args.num_tensors), ForwardTensor{});
  int64_t items = 0, tiles = 0, partial_elements = 0;
  for (int64_t i = 0; i < args.num_tensors; ++i) {
    const int64_t batch = args.batch[i], units = args.units[i];
    if (args.x[i] == nullptr || args.mean[i] == nullptr || args.variance[i] == nullptr)
      return "data pointers must not be null";
    const bool vectorized = units % VectorWidth(args.dtype) == 0 && Aligned(args.x[i], VectorBytes(args.dtype));
    Geometry g = TileShape(elem, vectorized ? VectorWidth(args.dtype) : 1, batch, units, tuning);
    const double share = static_cast<double>(batch) * static_cast<double>(units) / total;
    // The second-stage merge gives each unit of a tile one thread, so only tiles of at most
    // kThreads units are split over the batch.
    const int64_t max_splits = g.tile_units <= kThreads ? tuning.forward_max_splits : 1;
    ChooseSplits(&g, batch, share * static_cast<double>(tuning.forward_target_items),
                 tuning.forward_min_chunks, max_splits);
    ForwardTensor& d = plan->tensors[i];
    d.x = args.x[i];
    d.mean = args.mean[i];
    d.variance = args.variance[i];
    d.mean_residual = args.mean_residual ? args.mean_residual[i] : nullptr;
    d.batch = batch;
    d.units = units;
    d.rows_per_split = g.rows_per_split;
    d.partial_offset = partial_elements;
    d.tile_begin = tiles;
    d.item_begin = static_cast<int32_t>(items);
    d.tiles = static_cast<int32_t>(g.tiles);
    d.splits = static_cast<int32_t>(g.splits);
    d.log2_threads_per_row = g.log2_threads_per_row;
    d.vectorized = vectorized ? 1 : 0;
    if (g.splits > 1) partial_elements += g.tiles * g.splits * 2 * g.tile_units;
    if (g.tiles > 1 || g.splits > 1) plan->needs_counters = true;
    items += g.tiles * g.splits;
    tiles += g.tiles;
    if (items > INT32_MAX || g.tiles > INT32_MAX) return "tensors too large for one launch";
  }
  plan->num_items = items;
  plan->total_tiles = tiles;
  size_t offset = 0;
  plan->counters_offset = offset;
  plan->counters_bytes = plan->needs_counters ? sizeof(unsigned) * static_cast<size_t>(tiles + args.num_tensors) : 0;
  offset = AlignUp(offset + plan->counters_bytes);
  plan->tile_entropy_offset = offset;
  offset = AlignUp(offset + (plan->needs_counters ? sizeof(double) * static_cast<size_t>(tiles) : 0));
  plan->partials_offset = offset;
  offset = AlignUp(offset + static_cast<size_t>(stats) * static_cast<size_t>(partial_elements));
  plan->table_offset = offset;
  plan->table_bytes = args.num_tensors > kInlineTensors ? sizeof(ForwardTensor) * plan->tensors.size() : 0;
  offset = AlignUp(offset + plan->table_bytes);
  plan->workspace_bytes = (plan->needs_counters || partial_elements > 0 || plan->table_bytes > 0) ? offset : 0;
  return {};
}

inline std::string MakeBackwardPlan(const BackwardArgs& args, const Tuning& tuning, BackwardPlan* plan) {
  if (const char* error = ValidateArgs(args)) return error;
  if (args.num_tensors > 0 && (args.mean == nullptr || args.variance == nullptr ||
                               args.grad_entropy == nullptr || args.dx == nullptr))
    return "input and output arrays must not be null";
  if (args.num_tensors > INT32_MAX) return "too many tensors";
  const int elem = DTypeSize(args.dtype);
  const double total = TotalElements(args.num_tensors, args.batch, args.units);
  plan->tensors.assign(static_cast<size_t>(args.num_tensors), BackwardTensor{});
  int64_t items = 0;
  for (int64_t i = 0; i < args.num_tensors; ++i) {
    const int64_t batch = args.batch[i], units = args.units[i];
    if (args.x[i] == nullptr || args.dx[i] == nullptr || args.mean[i] == nullptr || args.variance[i] == nullptr)
      return "data pointers must not be null";
    const bool vectorized =
        units % VectorWidth(args.dtype) == 0 && Aligned(args.x[i], VectorBytes(args.dtype)) &&
        Aligned(args.dx[i], VectorBytes(args.dtype));
    Geometry g = TileShape(elem, vectorized ? VectorWidth(args.dtype) : 1, batch, units, tuning);
    const double share = static_cast<double>(batch) * static_cast<double>(units) / total;
    ChooseSplits(&g, batch, share * static_cast<double>(tuning.backward_target_items),
                 tuning.backward_min_chunks, INT32_MAX);
    BackwardTensor& d = plan->tensors[i];
    d.x = args.x[i];
    d.dx = args.dx[i];
    d.mean = args.mean[i];
    d.variance = args.variance[i];
    d.grad_mean = args.grad_mean ? args.grad_mean[i] : nullptr;
    d.grad_variance = args.grad_variance ? args.grad_variance[i] : nullptr;
    d.mean_residual = args.mean_residual ? args.mean_residual[i] : nullptr;
    d.batch = batch;
    d.units = units;
    d.rows_per_split = g.rows_per_split;
    const double dof = static_cast<double>(batch - args.ddof);
    d.entropy_factor = kPiE / (static_cast<double>(units) * dof);
    d.variance_factor = 2.0 / dof;
    d.mean_factor = 1.0 / static_cast<double>(batch);
    d.item_begin = static_cast<int32_t>(items);
    d.splits = static_cast<int32_t>(g.splits);
    d.log2_threads_per_row = g.log2_threads_per_row;
    d.vectorized = vectorized ? 1 : 0;
    items += g.tiles * g.splits;
    if (items > INT32_MAX) return "tensors too large for one launch";
  }
  plan->num_items = items;
  plan->table_offset = 0;
  plan->table_bytes = args.num_tensors > kInlineTensors ? sizeof(BackwardTensor) * plan->tensors.size() : 0;
  plan->workspace_bytes = AlignUp(plan->table_bytes);
  return {};
}

// Kernel parameters for a plan whose workspace starts at `workspace` (device address).
inline ForwardParams MakeForwardParams(const ForwardPlan& plan, const ForwardArgs& args, void* workspace) {
  ForwardParams p{};
  char* ws = static_cast<char*>(workspace);
  p.entropy = args.entropy;
  p.ddof = args.ddof;
  p.num_tensors = static_cast<int32_t>(args.num_tensors);
  p.num_items = static_cast<int32_t>(plan.num_items);
  if (plan.needs_counters) {
    p.tile_counters = reinterpret_cast<unsigned*>(ws + plan.counters_offset);
    p.tensor_counters = p.tile_counters + plan.total_tiles;
    p.tile_entropy = reinterpret_cast<double*>(ws + plan.tile_entropy_offset);
  }
  p.partials = ws ? ws + plan.partials_offset : nullptr;
  if (plan.table_bytes > 0) {
    p.table = reinterpret_cast<const ForwardTensor*>(ws + plan.table_offset);
  } else {
    std::copy(plan.tensors.begin(), plan.tensors.end(), p.inline_table);
  }
  return p;
}

inline BackwardParams MakeBackwardParams(const BackwardPlan& plan, const BackwardArgs& args, void* workspace) {
  BackwardParams p{};
  char* ws = static_cast<char*>(workspace);
  p.grad_entropy = args.grad_entropy;
  p.ddof = args.ddof;
  p.num_tensors = static_cast<int32_t>(args.num_tensors);
  p.num_items = static_cast<int32_t>(plan.num_items);
  if (plan.table_bytes > 0) {
    p.table = reinterpret_cast<const BackwardTensor*>(ws + plan.table_offset);
  } else {
    std::copy(plan.tensors.begin(), plan.tensors.end(), p.inline_table);
  }
  return p;
}

}  // namespace cuda
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CUDA_PLAN_H_
