// Framework-free definitions shared by the CPU and CUDA kernels, the TensorFlow binding and the
// pybind11 module. No TensorFlow, Python or CUDA headers here.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_COMMON_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_COMMON_H_

#include <cstdint>

namespace lbe {

// pi * e: H_j = 0.5 * ln(pi * e * v_j + 1).
constexpr double kPiE = 8.53973422267356706546;

// Element types of the activations. Statistics (mean, variance) are float32 for the first three
// and float64 for kFloat64; the entropies have the input's type.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

inline const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

inline int DTypeSize(DType dtype) { return dtype == DType::kFloat64 ? 8 : dtype == DType::kFloat32 ? 4 : 2; }
inline int StatsSize(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

// One group of tensors, each viewed as a row-major [batch, units] matrix. Arrays of pointers and
// sizes have num_tensors entries. On the CPU every pointer is a host pointer; for the CUDA entry
// points the descriptor arrays live on the host and the data pointers point to device memory.
struct ForwardArgs {
  DType dtype = DType::kFloat32;
  int64_t ddof = 1;
  int64_t num_tensors = 0;
  const void* const* x = nullptr;      // [batch_i, units_i], dtype
  const int64_t* batch = nullptr;
  const int64_t* units = nullptr;
  void* const* mean = nullptr;         // [units_i], stats type
  void* const* variance = nullptr;     // [units_i], stats type
  void* entropy = nullptr;             // [num_tensors], dtype
  // [units_i], stats type, or a null array / null entry: not written. The exact mean minus the
  // rounded `mean` (the low part of a two-term mean), for the backward: see BackwardArgs.
  void* const* mean_residual = nullptr;
};

// dx = dH/dx * grad_entropy + dmean/dx * grad_mean + dvariance/dx * grad_variance, which is
// (x - mu_j) * s_j + t_j per unit: x is read once and dx written once. mu_j = mean_j +
// mean_residual_j, the forward's two-term mean: a mean rounded to the statistics type is off by
// up to half an ulp of |mu_j|, which at a large offset (|mu_j| >> spread) is a large share of every
// x - mu_j, and the same share for every row: a push with one sign that the true dH/dx, which sums
// to zero over the batch, does not have. The kernels compute (x - mean_j) * s_j + (t_j -
// mean_residual_j * s_j), so the residual costs nothing per element.
struct BackwardArgs {
  DType dtype = DType::kFloat32;
  int64_t ddof = 1;
  int64_t num_tensors = 0;
  const void* const* x = nullptr;
  const int64_t* batch = nullptr;
  const int64_t* units = nullptr;
  const void* const* mean = nullptr;           // stats type, from the forward op
  const void* const* variance = nullptr;       // stats type, from the forward op
  const void* grad_entropy = nullptr;          // [num_tensors], dtype
  const void* const* grad_mean = nullptr;      // stats type; null array or null entry: zero
  const void* const* grad_variance = nullptr;  // stats type; null array or null entry: zero
  void* const* dx = nullptr;                   // [batch_i, units_i], dtype
  const void* const* mean_residual = nullptr;  // stats type; null array or null entry: zero
};

// Checks the descriptors (sizes, ddof); returns nullptr when they are valid, else a message.
// Bindings check their own inputs first and report errors naming their arguments; this is the
// core's last line of defence.
template <typename Args>
inline const char* ValidateArgs(const Args& args) {
  if (args.num_tensors < 0) return "num_tensors must be non-negative";
  if (args.ddof < 0) return "ddof must be non-negative";
  if (args.num_tensors > 0 && (args.x == nullptr || args.batch == nullptr || args.units == nullptr))
    return "descriptor arrays must not be null";
  for (int64_t i = 0; i < args.num_tensors; ++i) {
    if (args.batch[i] <= args.ddof) return "each batch must be larger than ddof";
    if (args.units[i] <= 0) return "each tensor needs at least one unit";
  }
  return nullptr;
}

}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_COMMON_H_
