// The one switch over the core's dtypes, for the kernels of each device and for the bindings:
// each names its element type for every dtype, and Dispatch calls a generic function with the one
// that a runtime DType stands for. Framework-free.
#ifndef LBE_OPS_CORE_BATCH_ENTROPY_DTYPE_H_
#define LBE_OPS_CORE_BATCH_ENTROPY_DTYPE_H_

#include <optional>
#include <string_view>
#include <type_traits>

#include "batch_entropy_common.h"

namespace lbe {

template <typename T>
struct TypeTag {
  using type = T;
};

// The element types one user of the core has for the four dtypes, in DType order. Dispatch is the
// one switch over DType: it calls f(TypeTag<E>{}) with E the element type of `dtype`, or
// on_unknown() for a value outside the enum.
template <typename Half, typename BFloat16, typename Float, typename Double>
struct ElementTypes {
  template <typename F, typename Unknown>
  static decltype(auto) Dispatch(DType dtype, F&& f, Unknown&& on_unknown) {
    switch (dtype) {
      case DType::kFloat16: return f(TypeTag<Half>{});
      case DType::kBFloat16: return f(TypeTag<BFloat16>{});
      case DType::kFloat32: return f(TypeTag<Float>{});
      case DType::kFloat64: return f(TypeTag<Double>{});
    }
    return on_unknown();
  }

  // The DType of element type T (a compile error for any other type).
  template <typename T>
  static constexpr DType Of() {
    static_assert(std::is_same_v<T, Half> || std::is_same_v<T, BFloat16> || std::is_same_v<T, Float> ||
                      std::is_same_v<T, Double>,
                  "not one of the core's element types");
    return std::is_same_v<T, Half>       ? DType::kFloat16
           : std::is_same_v<T, BFloat16> ? DType::kBFloat16
           : std::is_same_v<T, Float>    ? DType::kFloat32
                                         : DType::kFloat64;
  }
};

// The dtype named `name` ("float16" or "half", "bfloat16", "float32" or "float", "float64" or
// "double"), or nullopt.
inline std::optional<DType> ParseDType(std::string_view name) {
  if (name == "float16" || name == "half") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float32" || name == "float") return DType::kFloat32;
  if (name == "float64" || name == "double") return DType::kFloat64;
  return std::nullopt;
}

}  // namespace lbe

#endif  // LBE_OPS_CORE_BATCH_ENTROPY_DTYPE_H_
