// Host emulation of the CUDA kernels, for testing them where no GPU is (CI, laptops).
//
// batch_entropy_cuda_kernels.cuh is compiled by the host compiler against the primitives below:
// each block's 256 threads run as cooperative fibers on the calling thread, __syncthreads() is a
// fiber barrier (a barrier that some threads skip is reported, as is a thread that exits while
// others wait), and every global memory access is checked against the arrays the launch was given
// (out of bounds, writes to inputs, misaligned vectors). The workspace and shared memory
// start filled with NaN bytes, so a read of something nothing wrote shows up in the results.
// Blocks can run in any order, to check that the merges do not depend on it.
//
// What this does not check: the memory model of a real GPU (it runs one thread at a time), warp
// scheduling, and timing. The same plan code and kernel bodies are compiled by nvcc for the GPU.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_CUDA_EMULATION_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_CUDA_EMULATION_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "batch_entropy_common.h"
#include "batch_entropy_cuda_plan.h"

namespace lbe {
namespace cuda {
namespace emulation {

struct alignas(16) Vec16 {
  uint32_t w[4];
};
struct alignas(8) Vec8 {
  uint32_t w[2];
};

int ThreadIndex();
int64_t BlockIndex();
void SyncThreads();
void ThreadFence();
unsigned AtomicAdd(unsigned* p, unsigned v);
// Records an error unless [p, p + bytes) lies in one array of the launch (writable if `write`).
void CheckAccess(const void* p, size_t bytes, bool write);
void CheckAligned(const void* p, size_t alignment);

template <typename B> inline B LoadInput(const B* p) {
  CheckAccess(p, sizeof(B), false);
  B v;
  std::memcpy(&v, p, sizeof(B));
  return v;
}
inline Vec16 LoadInput16(const void* p) {
  CheckAligned(p, 16);
  CheckAccess(p, 16, false);
  Vec16 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void StoreOutput16(void* p, const Vec16& v) {
  CheckAligned(p, 16);
  CheckAccess(p, 16, true);
  std::memcpy(p, &v, 16);
}
inline Vec8 LoadInput8(const void* p) {
  CheckAligned(p, 8);
  CheckAccess(p, 8, false);
  Vec8 v;
  std::memcpy(&v, p, 8);
  return v;
}
inline void StoreOutput8(void* p, const Vec8& v) {
  CheckAligned(p, 8);
  CheckAccess(p, 8, true);
  std::memcpy(p, &v, 8);
}
template <typename B> inline void StoreOutput(B* p, B v) {
  CheckAccess(p, sizeof(B), true);
  std::memcpy(p, &v, sizeof(B));
}
template <typename B> inline B LoadGlobalL2(const B* p) { return LoadInput(p); }
template <typename B> inline void StoreGlobalL2(B* p, B v) { StoreOutput(p, v); }

inline float AsFloat(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t FloatBits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
inline double AsDouble(unsigned long long b) {
  double d;
  std::memcpy(&d, &b, 8);
  return d;
}
inline unsigned long long DoubleBits(double d) {
  unsigned long long b;
  std::memcpy(&b, &d, 8);
  return b;
}
inline float HalfToFloat(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
inline uint16_t FloatToHalf(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline uint16_t FloatToBFloat16(float f) {
  uint32_t bits = FloatBits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
inline float Log1p(float v) { return std::log1p(v); }
inline double Log1p(double v) { return std::log1p(v); }

struct Options {
  int block_order = 0;   // 0: ascending, 1: descending, 2: shuffled with `seed`
  uint64_t seed = 0;
};

struct Report {
  std::string error;          // empty on success
  size_t workspace_bytes = 0;
  int64_t num_items = 0;      // blocks launched
  int64_t kernel_launches = 0;
};

// Runs the forward / backward kernels on host memory (every pointer in args a host pointer).
Report Forward(const ForwardArgs& args, const Tuning& tuning, const Options& options);
Report Backward(const BackwardArgs& args, const Tuning& tuning, const Options& options);

}  // namespace emulation
}  // namespace cuda
}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_CUDA_EMULATION_H_
