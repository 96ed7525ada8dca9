// Bodies of the CUDA kernels, written once and compiled two ways: by nvcc as device code
// (batch_entropy_cuda.cu.cc wraps them in __global__ functions), and by the host compiler against
// the fiber emulation in batch_entropy_cuda_emulation.h, which runs every thread of a block as a
// coroutine so that the indexing, the barriers and the merges can be tested without a GPU.
// Everything the two differ in (thread indices, barriers, atomics, memory access) goes through the
// small set of primitives below.
//
// Forward, per block (one work item: a tile of units x a split of the batch):
//   1. each thread walks its rows kChunkRows at a time (kChunkRows independent vector loads in
//      flight: 16 bytes, 8 for 16-bit types), takes the exact two-pass mean and M2 of the chunk in
//      registers, of the values shifted by the unit's row-0 value (the pivot: an offset far above
//      the spread costs no accuracy), and merges it into its running (n, mean, M2) with Chan's
//      update;
//   2. the block's row lanes are merged in a fixed tree in shared memory;
//   3. a tile whose batch is not split writes mean and variance; otherwise the block writes its
//      partial moments and the last block of the tile to finish (an atomic ticket) merges all
//      partials in split order and writes them: deterministic whatever the arrival order;
//   4. each tile's sum of H_j goes to the workspace; the last tile of a tensor to finish sums them
//      in tile order and writes the entropy. A unit whose statistics are not finite is recomputed
//      on the wide path (batch_entropy_wide.h) by the thread that finishes it.
// Backward, per block: dx = (x - mean_j) * s_j + t_j with per-unit s_j, t_j in registers (t_j
// holds the mean residual's share, see BackwardArgs in batch_entropy_common.h); x read
// once and dx written once, kChunkRows vector loads in flight per thread. A thread whose units
// have a variance so large that s_j would underflow computes its rows on the wide path.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CUDA_KERNELS_CUH_
#define LBE_OPS_CORE_BATCH_ENTROPY_CUDA_KERNELS_CUH_

#include <cstdint>

#include "batch_entropy_common.h"
#include "batch_entropy_cuda_plan.h"
#include "batch_entropy_dtype.h"
#include "batch_entropy_wide.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define LBE_DEVICE __device__ __forceinline__
#define LBE_UNROLL _Pragma("unroll")
#else
#include "batch_entropy_cuda_emulation.h"
#define LBE_DEVICE inline
#define LBE_UNROLL
#endif

namespace lbe {
namespace cuda {
namespace kernels {

// ------------------------------------------------------------------------------------------
// Primitives
// ------------------------------------------------------------------------------------------
#if defined(__CUDACC__)
struct alignas(16) Vec16 { uint4 u; };
struct alignas(8) Vec8 { uint2 u; };

LBE_DEVICE int ThreadIndex() { return static_cast<int>(threadIdx.x); }
LBE_DEVICE int64_t BlockIndex() { return static_cast<int64_t>(blockIdx.x); }
LBE_DEVICE void SyncThreads() { __syncthreads(); }
LBE_DEVICE void ThreadFence() { __threadfence(); }
LBE_DEVICE unsigned AtomicAdd(unsigned* p, unsigned v) { return atomicAdd(p, v); }

// Read-only input data, through the non-coherent cache.
template <typename B> LBE_DEVICE B LoadInput(const B* p) { return __ldg(p); }
LBE_DEVICE Vec16 LoadInput16(const void* p) { return Vec16{__ldg(static_cast<const uint4*>(p))}; }
LBE_DEVICE Vec8 LoadInput8(const void* p) { return Vec8{__ldg(static_cast<const uint2*>(p))}; }
// Global stores even where the pointer came from a descriptor (else the compiler emits generic ST).
LBE_DEVICE void StoreOutput16(void* p, const Vec16& v) { __stwb(static_cast<uint4*>(p), v.u); }
LBE_DEVICE void StoreOutput8(void* p, const Vec8& v) { __stwb(static_cast<uint2*>(p), v.u); }
template <typename B> LBE_DEVICE void StoreOutput(B* p, B v) { __stwb(p, v); }
// Global memory that other blocks of this launch wrote or will read: cached in L2 only (ld.cg /
// st.cg), never a stale L1 line. Not __shared__ memory.
template <typename B> LBE_DEVICE B LoadGlobalL2(const B* p) { return __ldcg(p); }
template <typename B> LBE_DEVICE void StoreGlobalL2(B* p, B v) { __stcg(p, v); }

LBE_DEVICE float AsFloat(uint32_t b) { return __uint_as_float(b); }
LBE_DEVICE uint32_t FloatBits(float f) { return __float_as_uint(f); }
LBE_DEVICE double AsDouble(unsigned long long b) { return __longlong_as_double(static_cast<long long>(b)); }
LBE_DEVICE unsigned long long DoubleBits(double d) { return static_cast<unsigned long long>(__double_as_longlong(d)); }
LBE_DEVICE float HalfToFloat(uint16_t b) { return __half2float(__ushort_as_half(b)); }
LBE_DEVICE uint16_t FloatToHalf(float f) { return __half_as_ushort(__float2half_rn(f)); }
LBE_DEVICE uint16_t FloatToBFloat16(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
LBE_DEVICE float Log1p(float v) { return log1pf(v); }
LBE_DEVICE double Log1p(double v) { return log1p(v); }
#else
using emulation::Vec16;
using emulation::Vec8;
using emulation::LoadInput8;
using emulation::StoreOutput8;
using emulation::ThreadIndex;
using emulation::BlockIndex;
using emulation::SyncThreads;
using emulation::ThreadFence;
using emulation::AtomicAdd;
using emulation::LoadInput;
using emulation::LoadInput16;
using emulation::StoreOutput16;
using emulation::StoreOutput;
using emulation::LoadGlobalL2;
using emulation::StoreGlobalL2;
using emulation::AsFloat;
using emulation::FloatBits;
using emulation::AsDouble;
using emulation::DoubleBits;
using emulation::HalfToFloat;
using emulation::FloatToHalf;
using emulation::FloatToBFloat16;
using emulation::Log1p;
#endif

LBE_DEVICE float BFloat16ToFloat(uint16_t b) { return AsFloat(static_cast<uint32_t>(b) << 16); }

// ------------------------------------------------------------------------------------------
// Element types: storage bits, accumulation type, units per vector access
// ------------------------------------------------------------------------------------------
struct Half {};
struct BFloat16 {};
using KernelTypes = ElementTypes<Half, BFloat16, float, double>;

template <typename T> struct Elem;
template <> struct Elem<float> {
  using Bits = uint32_t;
  using Acc = float;
  static constexpr int kVec = 4;
  static LBE_DEVICE float ToAcc(Bits b) { return AsFloat(b); }
  static LBE_DEVICE Bits FromAcc(float a) { return FloatBits(a); }
};
template <> struct Elem<double> {
  using Bits = unsigned long long;
  using Acc = double;
  static constexpr int kVec = 2;
  static LBE_DEVICE double ToAcc(Bits b) { return AsDouble(b); }
  static LBE_DEVICE Bits FromAcc(double a) { return DoubleBits(a); }
};
template <> struct Elem<Half> {
  using Bits = uint16_t;
  using Acc = float;
  static constexpr int kVec = 4;  // 8-byte vectors: a thread's per-unit state stays small
  static LBE_DEVICE float ToAcc(Bits b) { return HalfToFloat(b); }
  static LBE_DEVICE Bits FromAcc(float a) { return FloatToHalf(a); }
};
template <> struct Elem<BFloat16> {
  using Bits = uint16_t;
  using Acc = float;
  static constexpr int kVec = 4;  // 8-byte vectors: a thread's per-unit state stays small
  static LBE_DEVICE float ToAcc(Bits b) { return BFloat16ToFloat(b); }
  static LBE_DEVICE Bits FromAcc(float a) { return FloatToBFloat16(a); }
};

// V consecutive elements' bits from p: one vector load (16 bytes, or 8 for 16-bit types) when V
// is the vector width (p is then aligned by the plan), else V scalar loads. Chunks stay as bits in registers until used:
// for 16-bit types that is half the registers of converted values.
template <typename E, int V>
LBE_DEVICE void LoadBits(const typename Elem<E>::Bits* p, typename Elem<E>::Bits (&out)[V]) {
  using Bits = typename Elem<E>::Bits;
  if constexpr (V * sizeof(Bits) == 16) {
    union { Vec16 v; Bits b[V]; } u;
    u.v = LoadInput16(p);
    LBE_UNROLL for (int i = 0; i < V; ++i) out[i] = u.b[i];
  } else if constexpr (V * sizeof(Bits) == 8) {
    union { Vec8 v; Bits b[V]; } u;
    u.v = LoadInput8(p);
    LBE_UNROLL for (int i = 0; i < V; ++i) out[i] = u.b[i];
  } else {
    LBE_UNROLL for (int i = 0; i < V; ++i) out[i] = LoadInput(p + i);
  }
}

template <typename E, int V>
LBE_DEVICE void StoreUnits(typename Elem<E>::Bits* p, const typename Elem<E>::Acc (&in)[V]) {
  using Bits = typename Elem<E>::Bits;
  if constexpr (V * sizeof(Bits) == 16) {
    union { Vec16 v; Bits b[V]; } u;
    LBE_UNROLL for (int i = 0; i < V; ++i) u.b[i] = Elem<E>::FromAcc(in[i]);
    StoreOutput16(p, u.v);
  } else if constexpr (V * sizeof(Bits) == 8) {
    union { Vec8 v; Bits b[V]; } u;
    LBE_UNROLL for (int i = 0; i < V; ++i) u.b[i] = Elem<E>::FromAcc(in[i]);
    StoreOutput8(p, u.v);
  } else {
    LBE_UNROLL for (int i = 0; i < V; ++i) StoreOutput(p + i, Elem<E>::FromAcc(in[i]));
  }
}

// Chan, Golub and LeVeque: merges (nb, mb, m2b) into (n, mean, m2), which holds the earlier rows.
template <typename Acc, int V>
LBE_DEVICE void MergeMoments(int64_t& n, Acc (&mean)[V], Acc (&m2)[V], int64_t nb, const Acc (&mb)[V],
                             const Acc (&m2b)[V]) {
  if (nb == 0) return;
  const int64_t total = n + nb;
  const Acc weight_b = static_cast<Acc>(nb) / static_cast<Acc>(total);
  const Acc weight_m2 = static_cast<Acc>(n) * weight_b;
  LBE_UNROLL for (int v = 0; v < V; ++v) {
    const Acc delta = mb[v] - mean[v];
    mean[v] += delta * weight_b;
    m2[v] += m2b[v] + delta * delta * weight_m2;
  }
  n = total;
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
template <typename E>
struct ForwardShared {
  using Acc = typename Elem<E>::Acc;
  Acc mean[Elem<E>::kVec][kThreads];
  Acc m2[Elem<E>::kVec][kThreads];
  int64_t count[kThreads];
  double sum[kThreads];
  int last;
};

// One chunk of up to kChunkRows rows, `step` elements apart, starting at p: its exact two-pass
// moments, merged into the thread's running moments.
template <typename E, int V, bool kFull>
LBE_DEVICE void AccumulateChunk(const typename Elem<E>::Bits* p, int64_t step, int rows,
                                const typename Elem<E>::Acc (&pivot)[V], int64_t& n,
                                typename Elem<E>::Acc (&mean)[V], typename Elem<E>::Acc (&m2)[V]) {
  using Acc = typename Elem<E>::Acc;
  using Bits = typename Elem<E>::Bits;
  Bits raw[kChunkRows][V];
  LBE_UNROLL for (int k = 0; k < kChunkRows; ++k) {
    if (kFull || k < rows) {
      LoadBits<E, V>(p + k * step, raw[k]);
    } else {
      LBE_UNROLL for (int v = 0; v < V; ++v) raw[k][v] = Bits(0);  // +0.0 in every type
    }
  }
  const Acc inv_rows = kFull ? Acc(1) / Acc(kChunkRows) : Acc(1) / static_cast<Acc>(rows);
  Acc chunk_mean[V], chunk_m2[V];
  LBE_UNROLL for (int v = 0; v < V; ++v) {
    static_assert(kChunkRows == 8, "the pairwise sum below is written for 8 rows");
    Acc x[kChunkRows];  // shifted by the unit's pivot; rows past the chunk's end are 0
    LBE_UNROLL for (int k = 0; k < kChunkRows; ++k)
      x[k] = (kFull || k < rows) ? Elem<E>::ToAcc(raw[k][v]) - pivot[v] : Acc(0);
    const Acc s = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
    chunk_mean[v] = s * inv_rows;
    Acc q = Acc(0);
    LBE_UNROLL for (int k = 0; k < kChunkRows; ++k) {
      const Acc d = (kFull || k < rows) ? x[k] - chunk_mean[v] : Acc(0);
      q += d * d;
    }
    chunk_m2[v] = q;
  }
  MergeMoments<Acc, V>(n, mean, m2, rows, chunk_mean, chunk_m2);
}

// Moments of the thread's rows row, row + lanes, ... < row_end of the V units at x + unit0, the
// mean that of x - pivot.
template <typename E, int V>
LBE_DEVICE void ThreadMoments(const typename Elem<E>::Bits* x, int64_t units, int64_t unit0, int64_t row,
                              int64_t row_end, int lanes, const typename Elem<E>::Acc (&pivot)[V], int64_t& n,
                              typename Elem<E>::Acc (&mean)[V], typename Elem<E>::Acc (&m2)[V]) {
  const int64_t step = static_cast<int64_t>(lanes) * units;
  const typename Elem<E>::Bits* p = x + row * units + unit0;
  const int64_t chunk_rows = static_cast<int64_t>(kChunkRows) * lanes;
  for (; row + (kChunkRows - 1) * static_cast<int64_t>(lanes) < row_end; row += chunk_rows, p += kChunkRows * step)
    AccumulateChunk<E, V, true>(p, step, kChunkRows, pivot, n, mean, m2);
  if (row < row_end) {
    const int rows = static_cast<int>((row_end - row + lanes - 1) / lanes);
    AccumulateChunk<E, V, false>(p, step, rows, pivot, n, mean, m2);
  }
}

// Merges the moments of threads tid, tid + stride_unit, tid + 2 stride_unit, ... (lanes of them)
// into the first lane, in a fixed tree. Every thread of the block must call it.
template <typename E, int V>
LBE_DEVICE void ReduceLanes(ForwardShared<E>& sm, int tid, int lane, int lanes, int log2_stride_unit,
                            int64_t& n, typename Elem<E>::Acc (&mean)[V], typename Elem<E>::Acc (&m2)[V]) {
  using Acc = typename Elem<E>::Acc;
  LBE_UNROLL for (int v = 0; v < V; ++v) {
    sm.mean[v][tid] = mean[v];
    sm.m2[v][tid] = m2[v];
  }
  sm.count[tid] = n;
  SyncThreads();
  for (int stride = lanes >> 1; stride > 0; stride >>= 1) {
    if (lane < stride) {
      const int other = tid + (stride << log2_stride_unit);
      Acc mb[V], m2b[V];
      LBE_UNROLL for (int v = 0; v < V; ++v) {
        mb[v] = sm.mean[v][other];
        m2b[v] = sm.m2[v][other];
      }
      MergeMoments<Acc, V>(n, mean, m2, sm.count[other], mb, m2b);
      LBE_UNROLL for (int v = 0; v < V; ++v) {
        sm.mean[v][tid] = mean[v];
        sm.m2[v][tid] = m2[v];
      }
      sm.count[tid] = n;
    }
    SyncThreads();
  }
}

// Sum over the block in a fixed order; the result is valid in thread 0.
template <typename E>
LBE_DEVICE double BlockSum(ForwardShared<E>& sm, int tid, double value) {
  sm.sum[tid] = value;
  SyncThreads();
  for (int stride = kThreads >> 1; stride > 0; stride >>= 1) {
    if (tid < stride) sm.sum[tid] += sm.sum[tid + stride];
    SyncThreads();
  }
  return tid == 0 ? sm.sum[0] : 0.0;
}

// The pivot of a unit: its value in row 0, or 0 where that is not finite (x - Inf would turn every
// value of the unit into NaN). Every split of a unit shifts by the same pivot.
template <typename E>
LBE_DEVICE typename Elem<E>::Acc LoadPivot(const typename Elem<E>::Bits* x, int64_t unit) {
  using Acc = typename Elem<E>::Acc;
  const Acc v = Elem<E>::ToAcc(LoadInput(x + unit));
  return v - v == Acc(0) ? v : Acc(0);
}

// Units unit0 + v, v in the bits of `mask`, on the wide path (batch_entropy_wide.h), read by this
// thread alone: writes their mean and variance and returns their sum of H_j.
template <typename E>
LBE_DEVICE double FinishWideUnits(const ForwardTensor& d, int64_t unit0, unsigned mask, int64_t ddof) {
  using Acc = typename Elem<E>::Acc;
  using Bits = typename Elem<E>::Bits;
  double h = 0.0;
  for (int v = 0; mask != 0; ++v, mask >>= 1) {
    if ((mask & 1u) == 0) continue;
    const Bits* column = static_cast<const Bits*>(d.x) + unit0 + v;
    const int64_t units = d.units;
    const wide::UnitMoments w = wide::ComputeUnitMoments(
        [&](int64_t r) { return static_cast<double>(Elem<E>::ToAcc(LoadInput(column + r * units))); }, d.batch,
        ddof);
    StoreOutput(static_cast<Acc*>(d.mean) + unit0 + v, static_cast<Acc>(w.mean));
    StoreOutput(static_cast<Acc*>(d.variance) + unit0 + v, static_cast<Acc>(w.Variance()));
    if (d.mean_residual != nullptr)
      StoreOutput(static_cast<Acc*>(d.mean_residual) + unit0 + v, wide::RoundedMeanResidual<Acc>(w.mean, w.mean_residual));
    h += w.entropy;
  }
  return h;
}

// Writes mean, variance and mean residual of the V units from unit0 on from their total moments
// (the mean that of x - pivot); returns their sum of H_j. Units whose statistics or H_j are not finite (an Inf or
// NaN in the input, or a sum of squares beyond the accumulator's range) are recomputed on the wide
// path: finite input then gets its finite entropy, and Inf and NaN give what the formula's
// arithmetic gives.
template <typename E, int V>
LBE_DEVICE double FinishUnits(const ForwardTensor& d, int64_t unit0, int64_t n, int64_t ddof,
                              const typename Elem<E>::Acc (&pivot)[V], const typename Elem<E>::Acc (&mean)[V],
                              const typename Elem<E>::Acc (&m2)[V]) {
  using Acc = typename Elem<E>::Acc;
  Acc* mean_out = static_cast<Acc*>(d.mean) + unit0;
  Acc* var_out = static_cast<Acc*>(d.variance) + unit0;
  Acc* residual_out = d.mean_residual != nullptr ? static_cast<Acc*>(d.mean_residual) + unit0 : nullptr;
  const Acc inv_dof = Acc(1) / static_cast<Acc>(n - ddof);
  const Acc pi_e = static_cast<Acc>(kPiE);
  double h = 0.0;
  unsigned wide_units = 0;
  LBE_UNROLL for (int v = 0; v < V; ++v) {
    const Acc mu = pivot[v] + mean[v];
    const Acc var = m2[v] * inv_dof;
    const double hv = static_cast<double>(Acc(0.5) * Log1p(pi_e * var));
    if (hv - hv == 0.0 && mu - mu == Acc(0)) {
      StoreOutput(mean_out + v, mu);
      StoreOutput(var_out + v, var);
      if (residual_out != nullptr) StoreOutput(residual_out + v, wide::SumResidual(pivot[v], mean[v], mu));
      h += hv;
    } else {
      wide_units |= 1u << v;
    }
  }
  if (wide_units != 0) h += FinishWideUnits<E>(d, unit0, wide_units, ddof);
  return h;
}

// The tile's sum of H_j is known (h, one part per thread): the entropy of a one-tile tensor is
// written at once; otherwise the last tile of the tensor sums all tiles in order.
template <typename E>
LBE_DEVICE void FinishTile(ForwardShared<E>& sm, const ForwardParams& p, const ForwardTensor& d, int t,
                           int64_t tile, int tid, double h) {
  using Acc = typename Elem<E>::Acc;
  using Bits = typename Elem<E>::Bits;
  Bits* entropy = static_cast<Bits*>(p.entropy) + t;
  const double tile_sum = BlockSum<E>(sm, tid, h);
  if (d.tiles == 1) {
    if (tid == 0) StoreOutput(entropy, Elem<E>::FromAcc(static_cast<Acc>(tile_sum / static_cast<double>(d.units))));
    return;
  }
  if (tid == 0) {
    StoreGlobalL2(p.tile_entropy + d.tile_begin + tile, tile_sum);
    ThreadFence();
    const unsigned ticket = AtomicAdd(p.tensor_counters + t, 1u);
    sm.last = ticket == static_cast<unsigned>(d.tiles - 1);
  }
  SyncThreads();
  if (!sm.last) return;
  ThreadFence();
  // kBatch loads in flight per thread, then added in tile order (a wide tensor has thousands).
  constexpr int kBatch = 8;
  double s = 0.0;
  for (int64_t i0 = tid; i0 < d.tiles; i0 += kBatch * kThreads) {
    double part[kBatch];
    LBE_UNROLL for (int j = 0; j < kBatch; ++j) {
      const int64_t i = i0 + j * kThreads;
      part[j] = i < d.tiles ? LoadGlobalL2(p.tile_entropy + d.tile_begin + i) : 0.0;
    }
    LBE_UNROLL for (int j = 0; j < kBatch; ++j) s += part[j];
  }
  const double total = BlockSum<E>(sm, tid, s);
  if (tid == 0) StoreOutput(entropy, Elem<E>::FromAcc(static_cast<Acc>(total / static_cast<double>(d.units))));
}

template <typename E, int V>
LBE_DEVICE void ForwardItem(ForwardShared<E>& sm, const ForwardParams& p, const ForwardTensor& d, int t,
                            int64_t tile, int64_t split, int tid) {
  using Acc = typename Elem<E>::Acc;
  using Bits = typename Elem<E>::Bits;
  const int lp = d.log2_threads_per_row;
  const int col = tid & ((1 << lp) - 1);
  const int row_lane = tid >> lp;
  const int lanes = kThreads >> lp;
  const int64_t tile_units = static_cast<int64_t>(V) << lp;
  const int64_t unit0 = tile * tile_units + static_cast<int64_t>(col) * V;
  const bool col_valid = unit0 < d.units;  // all V units are valid then (units % V == 0 for V > 1)
  const int64_t row_begin = split * d.rows_per_split;
  const int64_t row_end = row_begin + d.rows_per_split < d.batch ? row_begin + d.rows_per_split : d.batch;

  int64_t n = 0;
  Acc mean[V], m2[V], pivot[V];
  LBE_UNROLL for (int v = 0; v < V; ++v) mean[v] = m2[v] = pivot[v] = Acc(0);
  if (col_valid) {
    LBE_UNROLL for (int v = 0; v < V; ++v) pivot[v] = LoadPivot<E>(static_cast<const Bits*>(d.x), unit0 + v);
    ThreadMoments<E, V>(static_cast<const Bits*>(d.x), d.units, unit0, row_begin + row_lane, row_end, lanes,
                        pivot, n, mean, m2);
  }
  ReduceLanes<E, V>(sm, tid, row_lane, lanes, lp, n, mean, m2);

  if (d.splits == 1) {
    double h = 0.0;
    if (row_lane == 0 && col_valid) h = FinishUnits<E, V>(d, unit0, n, p.ddof, pivot, mean, m2);
    FinishTile<E>(sm, p, d, t, tile, tid, h);
    return;
  }

  // Split batch: publish this split's moments; the tile's last block merges them all.
  Acc* const tile_partials =
      static_cast<Acc*>(p.partials) + d.partial_offset + tile * d.splits * 2 * tile_units;
  if (row_lane == 0) {
    Acc* part = tile_partials + split * 2 * tile_units;
    LBE_UNROLL for (int v = 0; v < V; ++v) {
      StoreGlobalL2(part + col * V + v, mean[v]);
      StoreGlobalL2(part + tile_units + col * V + v, m2[v]);
    }
  }
  ThreadFence();
  SyncThreads();
  if (tid == 0) {
    const unsigned ticket = AtomicAdd(p.tile_counters + d.tile_begin + tile, 1u);
    sm.last = ticket == static_cast<unsigned>(d.splits - 1);
  }
  SyncThreads();
  if (!sm.last) return;
  ThreadFence();

  // One thread per unit of the tile (tile_units <= kThreads, a power of two), `merge_lanes`
  // threads per unit, each merging every merge_lanes-th split in order, then a tree.
  int log2_tile_units = lp;
  for (int v = V; v > 1; v >>= 1) ++log2_tile_units;
  const int u = tid & static_cast<int>(tile_units - 1);
  const int merge_lane = tid >> log2_tile_units;
  const int merge_lanes = kThreads >> log2_tile_units;
  int64_t mn = 0;
  Acc mmean[1] = {Acc(0)}, mm2[1] = {Acc(0)};
  // Splits merge_lane, merge_lane + merge_lanes, ... in order; kBatch of them loaded at a time so
  // that the loads overlap (a tall tensor has up to forward_max_splits of them).
  constexpr int kBatch = 4;
  for (int64_t s0 = merge_lane; s0 < d.splits; s0 += kBatch * merge_lanes) {
    Acc pm[kBatch][1], pm2[kBatch][1];
    LBE_UNROLL for (int j = 0; j < kBatch; ++j) {
      const int64_t s = s0 + j * merge_lanes;
      const Acc* part = tile_partials + s * 2 * tile_units;
      pm[j][0] = s < d.splits ? LoadGlobalL2(part + u) : Acc(0);
      pm2[j][0] = s < d.splits ? LoadGlobalL2(part + tile_units + u) : Acc(0);
    }
    LBE_UNROLL for (int j = 0; j < kBatch; ++j) {
      const int64_t rows_begin = (s0 + j * merge_lanes) * d.rows_per_split;
      const int64_t left = d.batch - rows_begin;
      const int64_t rows = left <= 0 ? 0 : left < d.rows_per_split ? left : d.rows_per_split;
      MergeMoments<Acc, 1>(mn, mmean, mm2, rows, pm[j], pm2[j]);  // rows == 0: no-op
    }
  }
  ReduceLanes<E, 1>(sm, tid, merge_lane, merge_lanes, log2_tile_units, mn, mmean, mm2);
  const int64_t unit = tile * tile_units + u;
  double h = 0.0;
  if (merge_lane == 0 && unit < d.units) {
    const Acc unit_pivot[1] = {LoadPivot<E>(static_cast<const Bits*>(d.x), unit)};
    h = FinishUnits<E, 1>(d, unit, mn, p.ddof, unit_pivot, mmean, mm2);
  }
  FinishTile<E>(sm, p, d, t, tile, tid, h);
}

// The last tensor whose first item is <= item (each tensor has at least one item).
template <typename Desc>
LBE_DEVICE int FindTensor(const Desc* table, int num_tensors, int64_t item) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[mid].item_begin <= item) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename E>
LBE_DEVICE void ForwardBlock(const ForwardParams& p, ForwardShared<E>& sm) {
  const ForwardTensor* table = p.num_tensors <= kInlineTensors ? p.inline_table : p.table;
  const int64_t item = BlockIndex();
  const int t = FindTensor(table, p.num_tensors, item);
  const ForwardTensor& d = table[t];  // a reference: fields are read where used, not held in registers
  const int64_t local = item - d.item_begin;
  const int64_t tile = local / d.splits;
  const int64_t split = local - tile * d.splits;
  const int tid = ThreadIndex();
  if (d.vectorized)
    ForwardItem<E, Elem<E>::kVec>(sm, p, d, t, tile, split, tid);
  else
    ForwardItem<E, 1>(sm, p, d, t, tile, split, tid);
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------
template <typename E, int V, bool kFull>
LBE_DEVICE void BackwardChunk(const typename Elem<E>::Bits* x, typename Elem<E>::Bits* dx, int64_t step, int rows,
                              const typename Elem<E>::Acc (&mean)[V], const typename Elem<E>::Acc (&scale)[V],
                              const typename Elem<E>::Acc (&shift)[V]) {
  using Acc = typename Elem<E>::Acc;
  using Bits = typename Elem<E>::Bits;
  Bits raw[kChunkRows][V];
  LBE_UNROLL for (int k = 0; k < kChunkRows; ++k)
    if (kFull || k < rows) LoadBits<E, V>(x + k * step, raw[k]);
  LBE_UNROLL for (int k = 0; k < kChunkRows; ++k) {
    if (kFull || k < rows) {
      Acc out[V];
      LBE_UNROLL for (int v = 0; v < V; ++v)
        out[v] = (Elem<E>::ToAcc(raw[k][v]) - mean[v]) * scale[v] + shift[v];
      StoreUnits<E, V>(dx + k * step, out);
    }
  }
}

// The thread's rows row, row + lanes, ... < row_end of units [unit0, unit0 + V) on the wide path,
// in double: units whose variance is huge, or overflowed the statistics type (then this thread
// recomputes it from the column).
template <typename E, int V>
LBE_DEVICE void WideBackwardRows(const BackwardParams& p, const BackwardTensor& d, int t, int64_t unit0,
                                 int64_t row, int64_t row_end, int lanes) {
  using Acc = typename Elem<E>::Acc;
  using Bits = typename Elem<E>::Bits;
  const Bits* x = static_cast<const Bits*>(d.x);
  Bits* dx = static_cast<Bits*>(d.dx);
  const int64_t units = d.units;
  const double g = static_cast<double>(Elem<E>::ToAcc(LoadInput(static_cast<const Bits*>(p.grad_entropy) + t)));
  const double dof = static_cast<double>(d.batch - p.ddof);
  for (int v = 0; v < V; ++v) {
    const int64_t unit = unit0 + v;
    const double var = static_cast<double>(LoadInput(static_cast<const Acc*>(d.variance) + unit));
    double scaled_variance = var;
    int k = 0;
    if (var - var != 0.0 && var > 0.0) {  // +inf: not representable in the statistics type
      const Bits* column = x + unit;
      const wide::UnitMoments w = wide::ComputeUnitMoments(
          [&](int64_t r) { return static_cast<double>(Elem<E>::ToAcc(LoadInput(column + r * units))); },
          d.batch, p.ddof);
      scaled_variance = w.scaled_variance;
      k = w.k;
    } else {
      k = wide::VarianceExponent(var);
      scaled_variance = wide::Scale2(var, -2 * k);
    }
    const double gv = d.grad_variance ? static_cast<double>(LoadInput(static_cast<const Acc*>(d.grad_variance) + unit)) : 0.0;
    const double gm = d.grad_mean ? static_cast<double>(LoadInput(static_cast<const Acc*>(d.grad_mean) + unit)) : 0.0;
    const double residual =
        d.mean_residual ? static_cast<double>(LoadInput(static_cast<const Acc*>(d.mean_residual) + unit)) : 0.0;
    const wide::UnitGradient u = wide::ComputeUnitGradient(
        static_cast<double>(LoadInput(static_cast<const Acc*>(d.mean) + unit)), residual, scaled_variance, k,
        g, static_cast<double>(units), dof, gv, gm, static_cast<double>(d.batch));
    for (int64_t r = row; r < row_end; r += lanes) {
      const double xv = static_cast<double>(Elem<E>::ToAcc(LoadInput(x + r * units + unit)));
      StoreOutput(dx + r * units + unit, Elem<E>::FromAcc(static_cast<Acc>(u.Dx(xv))));
    }
  }
}

template <typename E, int V>
LBE_DEVICE void BackwardItem(const BackwardParams& p, const BackwardTensor& d, int t, int64_t tile, int64_t split,
                             int tid) {
  using Acc = typename Elem<E>::Acc;
  using Bits = typename Elem<E>::Bits;
  const int lp = d.log2_threads_per_row;
  const int col = tid & ((1 << lp) - 1);
  const int row_lane = tid >> lp;
  const int lanes = kThreads >> lp;
  const int64_t unit0 = tile * (static_cast<int64_t>(V) << lp) + static_cast<int64_t>(col) * V;
  int64_t row = split * d.rows_per_split;
  const int64_t row_end = row + d.rows_per_split < d.batch ? row + d.rows_per_split : d.batch;
  row += row_lane;
  if (unit0 >= d.units || row >= row_end) return;  // no barriers in this kernel

  const Acc g = Elem<E>::ToAcc(LoadInput(static_cast<const Bits*>(p.grad_entropy) + t));
  const Acc pi_e = static_cast<Acc>(kPiE);
  const Acc entropy_factor = static_cast<Acc>(d.entropy_factor);
  const Acc variance_factor = static_cast<Acc>(d.variance_factor);
  const Acc mean_factor = static_cast<Acc>(d.mean_factor);
  const Acc* mean_in = static_cast<const Acc*>(d.mean) + unit0;
  const Acc* var_in = static_cast<const Acc*>(d.variance) + unit0;
  const Acc* grad_mean = d.grad_mean ? static_cast<const Acc*>(d.grad_mean) + unit0 : nullptr;
  const Acc* grad_var = d.grad_variance ? static_cast<const Acc*>(d.grad_variance) + unit0 : nullptr;
  const Acc* residual = d.mean_residual ? static_cast<const Acc*>(d.mean_residual) + unit0 : nullptr;
  Acc mean[V], scale[V], shift[V];
  Acc max_var = Acc(0);  // NaN ignored
  LBE_UNROLL for (int v = 0; v < V; ++v) {
    mean[v] = LoadInput(mean_in + v);
    const Acc var = LoadInput(var_in + v);
    Acc s = g * entropy_factor / (pi_e * var + Acc(1));
    if (grad_var) s += LoadInput(grad_var + v) * variance_factor;
    scale[v] = s;
    shift[v] = grad_mean ? LoadInput(grad_mean + v) * mean_factor : Acc(0);
    if (residual) {  // (x - mean - r) s + t = (x - mean) s + (t - r s); r = 0 leaves t as it is
      const Acc r = LoadInput(residual + v);
      if (r != Acc(0)) shift[v] -= r * s;
    }
    max_var = var > max_var ? var : max_var;
  }
  // Above the threshold the factor s loses precision or underflows: the wide path.
  if (static_cast<double>(max_var) >
      wide::WideVarianceThreshold(static_cast<double>(g) * d.entropy_factor, sizeof(Acc) == 8)) {
    WideBackwardRows<E, V>(p, d, t, unit0, row, row_end, lanes);
    return;
  }

  const int64_t step = static_cast<int64_t>(lanes) * d.units;
  const int64_t offset = row * d.units + unit0;
  const Bits* x = static_cast<const Bits*>(d.x) + offset;
  Bits* dx = static_cast<Bits*>(d.dx) + offset;
  const int64_t chunk_rows = static_cast<int64_t>(kChunkRows) * lanes;
  for (; row + (kChunkRows - 1) * static_cast<int64_t>(lanes) < row_end;
       row += chunk_rows, x += kChunkRows * step, dx += kChunkRows * step)
    BackwardChunk<E, V, true>(x, dx, step, kChunkRows, mean, scale, shift);
  if (row < row_end) {
    const int rows = static_cast<int>((row_end - row + lanes - 1) / lanes);
    BackwardChunk<E, V, false>(x, dx, step, rows, mean, scale, shift);
  }
}

template <typename E>
LBE_DEVICE void BackwardBlock(const BackwardParams& p) {
  const BackwardTensor* table = p.num_tensors <= kInlineTensors ? p.inline_table : p.table;
  const int64_t item = BlockIndex();
  const int t = FindTensor(table, p.num_tensors, item);
  const BackwardTensor& d = table[t];
  const int64_t local = item - d.item_begin;
  const int64_t tile = local / d.splits;
  const int64_t split = local - tile * d.splits;
  const int tid = ThreadIndex();
  if (d.vectorized)
    BackwardItem<E, Elem<E>::kVec>(p, d, t, tile, split, tid);
  else
    BackwardItem<E, 1>(p, d, t, tile, split, tid);
}

}  // namespace kernels
}  // namespace cuda
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CUDA_KERNELS_CUH_
