// lbe_ops._core: the framework-free core on numpy arrays (CPU) and on device arrays of any
// library with __cuda_array_interface__ (CUDA), for tests and benchmarks without TensorFlow.
// This file only checks its inputs, fills the core's descriptors and dispatches.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "batch_entropy_binding.h"
#include "batch_entropy_common.h"
#include "batch_entropy_cpu.h"
#include "batch_entropy_cuda_emulation.h"
#include "batch_entropy_cuda_plan.h"
#if defined(LBE_OPS_HAVE_CUDA)
#include <cuda_runtime_api.h>

#include "batch_entropy_cuda.h"
#endif

namespace py = pybind11;

namespace {

std::string Indexed(const std::string& name, size_t i) { return name + "[" + std::to_string(i) + "]"; }

// ---------------------------------------------------------------------------------------------
// dtypes
// ---------------------------------------------------------------------------------------------
py::object BFloat16Type() {
  try {
    return py::module_::import("ml_dtypes").attr("bfloat16");
  } catch (py::error_already_set&) {
    return py::none();
  }
}

py::dtype NumpyDType(lbe::DType dtype) {
  if (dtype != lbe::DType::kBFloat16) return py::dtype(lbe::DTypeName(dtype));
  py::object bf16 = BFloat16Type();
  if (bf16.is_none()) throw py::type_error("bfloat16 needs the ml_dtypes package");
  return py::dtype::from_args(bf16);
}

py::dtype StatsDType(lbe::DType dtype) { return py::dtype(dtype == lbe::DType::kFloat64 ? "float64" : "float32"); }

// The core's dtype of a numpy dtype (by its name: numpy never names them "half" or "double").
std::optional<lbe::DType> CoreDType(const py::dtype& dt) {
  return lbe::ParseDType(std::string(py::str(dt.attr("name"))));
}

// A list or tuple of n entries (a bare array is refused: iterating it would give its rows).
py::sequence CheckList(py::handle obj, const std::string& name, std::optional<size_t> n) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
    throw py::type_error(name + " must be a list or tuple of arrays, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
  if (n && seq.size() != *n)
    throw py::value_error(name + " must have " + std::to_string(*n) + " entries (one per tensor), got " +
                          std::to_string(seq.size()));
  return seq;
}

int64_t CheckDdof(int64_t ddof) {
  if (ddof < 0) throw py::value_error("ddof must be non-negative, got " + std::to_string(ddof));
  return ddof;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// A shape as a list of sizes, for lbe::AddActivation.
struct VectorShape {
  static int64_t Rank(const std::vector<int64_t>& shape) { return static_cast<int64_t>(shape.size()); }
  static int64_t Dim(const std::vector<int64_t>& shape, int64_t d) { return shape[d]; }
  static std::string String(const std::vector<int64_t>& shape) { return ShapeString(shape); }
};

// Appends activation `name` (index i of the list `base`) to *in; a ValueError names it when the shape
// does not fit the core, a TypeError when its dtype is not the group's.
void AddActivation(const std::vector<int64_t>& shape, const void* data, lbe::DType dtype, const char* base,
                   size_t i, lbe::Activations* in) {
  const lbe::ArgName name{base, static_cast<int64_t>(i)};
  std::string error = lbe::CheckGroupDType(dtype, name, in);
  if (!error.empty()) throw py::type_error(error);
  error = lbe::AddActivation<VectorShape>(shape, data, name, /*allow_small_batch=*/false, in);
  if (!error.empty()) throw py::value_error(error);
}

// ---------------------------------------------------------------------------------------------
// Host (numpy) arrays
// ---------------------------------------------------------------------------------------------
py::array Contiguous(py::handle obj, const std::string& name, std::optional<py::dtype> dtype = std::nullopt) {
  py::module_ np = py::module_::import("numpy");
  try {
    if (dtype) return np.attr("ascontiguousarray")(obj, py::arg("dtype") = *dtype);
    return np.attr("ascontiguousarray")(obj);
  } catch (py::error_already_set& e) {
    throw py::type_error(name + " cannot be read as an array" +
                         (dtype ? " of " + std::string(py::str(*dtype)) : std::string()) + ": " + e.what());
  }
}

std::vector<int64_t> ShapeOf(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

// Reads the activations into *in (whose ddof is set); returns the arrays, which keep the data alive.
std::vector<py::array> ReadHostActivations(py::handle xs_obj, lbe::Activations* in) {
  py::sequence seq = CheckList(xs_obj, "xs", std::nullopt);
  if (seq.size() == 0) throw py::value_error("xs must not be empty");
  std::vector<py::array> arrays;
  for (size_t i = 0; i < seq.size(); ++i) {
    const std::string name = Indexed("xs", i);
    py::array a = Contiguous(seq[i], name);
    const std::optional<lbe::DType> dt = CoreDType(a.dtype());
    if (!dt)
      throw py::type_error(name + " has dtype " + std::string(py::str(a.dtype())) +
                           "; expected float16, bfloat16, float32 or float64");
    AddActivation(ShapeOf(a), a.data(), *dt, "xs", i, in);
    arrays.push_back(std::move(a));
  }
  return arrays;
}

py::array StatsArray(py::handle obj, const std::string& name, lbe::DType dtype, int64_t units) {
  py::array a = Contiguous(obj, name, StatsDType(dtype));
  if (a.size() != units)
    throw py::value_error(name + " has " + std::to_string(a.size()) + " elements; expected " +
                          std::to_string(units) + " (one per unit)");
  return a;
}

// Optional per-tensor statistics (None, or a list whose entries may be None).
std::vector<py::array> OptionalStats(py::handle obj, const std::string& name, const lbe::Activations& in,
                                     std::vector<const void*>* ptrs) {
  std::vector<py::array> arrays;
  const size_t n = in.size();
  ptrs->assign(n, nullptr);
  if (obj.is_none()) return arrays;
  py::sequence seq = CheckList(obj, name, n);
  for (size_t i = 0; i < n; ++i) {
    if (seq[i].is_none()) continue;
    arrays.push_back(StatsArray(seq[i], Indexed(name, i), in.dtype, in.units[i]));
    (*ptrs)[i] = arrays.back().data();
  }
  return arrays;
}

// Runs the core on the calling thread without the GIL; its error becomes a ValueError.
template <typename Args>
void RunWithoutGil(const std::function<std::string(const Args&)>& run, const Args& args) {
  std::string error;
  {
    py::gil_scoped_release release;
    error = run(args);
  }
  if (!error.empty()) throw py::value_error(error);
}

py::tuple HostForward(py::handle xs_obj, int64_t ddof, const std::function<std::string(const lbe::ForwardArgs&)>& run) {
  lbe::ForwardCall call;
  call.in.ddof = CheckDdof(ddof);
  const std::vector<py::array> xs = ReadHostActivations(xs_obj, &call.in);
  const size_t n = xs.size();
  const py::dtype stats_dtype = StatsDType(call.in.dtype);
  py::array entropies(NumpyDType(call.in.dtype), std::vector<py::ssize_t>{static_cast<py::ssize_t>(n)});
  py::list means, variances, residuals;
  for (size_t i = 0; i < n; ++i) {
    std::vector<py::ssize_t> shape(xs[i].shape() + 1, xs[i].shape() + xs[i].ndim());
    py::array m(stats_dtype, shape), v(stats_dtype, shape), r(stats_dtype, shape);
    call.mean.push_back(m.mutable_data());
    call.variance.push_back(v.mutable_data());
    call.mean_residual.push_back(r.mutable_data());
    means.append(m);
    variances.append(v);
    residuals.append(r);
  }
  call.entropy = entropies.mutable_data();
  RunWithoutGil(run, call.Args());
  return py::make_tuple(entropies, means, variances, residuals);
}

py::list HostBackward(py::handle xs_obj, py::handle means_obj, py::handle vars_obj, py::handle grad_entropies_obj,
                      py::handle grad_means_obj, py::handle grad_vars_obj, py::handle residuals_obj, int64_t ddof,
                      const std::function<std::string(const lbe::BackwardArgs&)>& run) {
  lbe::BackwardCall call;
  call.in.ddof = CheckDdof(ddof);
  const std::vector<py::array> xs = ReadHostActivations(xs_obj, &call.in);
  const size_t n = xs.size();
  const lbe::DType dtype = call.in.dtype;
  py::sequence means_seq = CheckList(means_obj, "means", n);
  py::sequence vars_seq = CheckList(vars_obj, "variances", n);
  std::vector<py::array> keep;
  for (size_t i = 0; i < n; ++i) {
    keep.push_back(StatsArray(means_seq[i], Indexed("means", i), dtype, call.in.units[i]));
    call.mean.push_back(keep.back().data());
    keep.push_back(StatsArray(vars_seq[i], Indexed("variances", i), dtype, call.in.units[i]));
    call.variance.push_back(keep.back().data());
  }
  py::array grad_entropies = Contiguous(grad_entropies_obj, "grad_entropies", NumpyDType(dtype));
  if (grad_entropies.size() != static_cast<py::ssize_t>(n))
    throw py::value_error("grad_entropies has " + std::to_string(grad_entropies.size()) + " elements; expected " +
                          std::to_string(n) + " (one per tensor)");
  call.grad_entropy = grad_entropies.data();
  std::vector<py::array> gm = OptionalStats(grad_means_obj, "grad_means", call.in, &call.grad_mean);
  std::vector<py::array> gv = OptionalStats(grad_vars_obj, "grad_variances", call.in, &call.grad_variance);
  std::vector<py::array> rs = OptionalStats(residuals_obj, "mean_residuals", call.in, &call.mean_residual);
  py::list dxs;
  for (size_t i = 0; i < n; ++i) {
    py::array dx(xs[i].dtype(), std::vector<py::ssize_t>(xs[i].shape(), xs[i].shape() + xs[i].ndim()));
    call.dx.push_back(dx.mutable_data());
    dxs.append(dx);
  }
  RunWithoutGil(run, call.Args());
  return dxs;
}

lbe::cuda::emulation::Options EmulationOptions(int block_order, uint64_t seed) {
  if (block_order < 0 || block_order > 2)
    throw py::value_error("block_order must be 0 (ascending), 1 (descending) or 2 (shuffled)");
  lbe::cuda::emulation::Options options;
  options.block_order = block_order;
  options.seed = seed;
  return options;
}

py::dict ReportDict(const lbe::cuda::emulation::Report& r) {
  py::dict d;
  d["workspace_bytes"] = r.workspace_bytes;
  d["num_items"] = r.num_items;
  d["kernel_launches"] = r.kernel_launches;
  return d;
}

// ---------------------------------------------------------------------------------------------
// Device arrays (__cuda_array_interface__), in builds with the CUDA kernels
// ---------------------------------------------------------------------------------------------
#if defined(LBE_OPS_HAVE_CUDA)
struct DeviceArray {
  uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  int64_t size = 1;
  int itemsize = 0;
  char kind = 0;
  bool readonly = false;
};

// Interned keys of the interface dict: each lookup is then one hash probe, no string creation
// (small shapes are launch-bound, so the binding's own cost matters).
struct InterfaceKeys {
  py::str attribute{"__cuda_array_interface__"}, shape{"shape"}, typestr{"typestr"}, data{"data"},
      strides{"strides"}, mask{"mask"};
};
const InterfaceKeys& Keys() {
  static const InterfaceKeys* keys = new InterfaceKeys();  // lives as long as the interpreter
  return *keys;
}

int64_t ToInt64(PyObject* o, const std::string& name, const char* what) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::type_error(name + ": __cuda_array_interface__ " + what + " must hold integers");
  }
  return v;
}

DeviceArray ReadDeviceArray(py::handle obj, const std::string& name) {
  const InterfaceKeys& keys = Keys();
  py::object holder;
  PyObject* dict = obj.ptr();
  if (!PyDict_Check(dict)) {
    PyObject* attr = PyObject_GetAttr(dict, keys.attribute.ptr());
    if (attr == nullptr) {
      const bool missing = PyErr_ExceptionMatches(PyExc_AttributeError);
      std::string why;
      if (!missing) {
        py::error_already_set e;
        why = e.what();
      } else {
        PyErr_Clear();
      }
      if (missing)
        throw py::type_error(name + " must be a device array with __cuda_array_interface__ (CuPy, PyTorch, ...), "
                             "got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
      throw py::type_error(name + ": its __cuda_array_interface__ failed (" + why +
                           "); for bfloat16 tensors pass a dict with the interface's keys and dtype='bfloat16'");
    }
    holder = py::reinterpret_steal<py::object>(attr);
    dict = attr;
    if (!PyDict_Check(dict)) throw py::type_error(name + ": __cuda_array_interface__ is not a dict");
  }
  PyObject* shape = PyDict_GetItem(dict, keys.shape.ptr());  // borrowed references
  PyObject* typestr = PyDict_GetItem(dict, keys.typestr.ptr());
  PyObject* data = PyDict_GetItem(dict, keys.data.ptr());
  if (shape == nullptr || typestr == nullptr || data == nullptr)
    throw py::type_error(name + ": __cuda_array_interface__ lacks shape, typestr or data");
  if (!PyTuple_Check(shape) && !PyList_Check(shape))
    throw py::type_error(name + ": __cuda_array_interface__ shape must be a tuple");
  DeviceArray a;
  const Py_ssize_t rank = PySequence_Fast_GET_SIZE(shape);
  PyObject** dims = PySequence_Fast_ITEMS(shape);
  for (Py_ssize_t i = 0; i < rank; ++i) {
    a.shape.push_back(ToInt64(dims[i], name, "shape"));
    if (a.shape.back() < 0) throw py::value_error(name + " has a negative dimension");
    a.size *= a.shape.back();
  }
  Py_ssize_t len = 0;
  const char* ts = PyUnicode_Check(typestr) ? PyUnicode_AsUTF8AndSize(typestr, &len) : nullptr;
  if (ts == nullptr || len < 3 || (ts[0] != '<' && ts[0] != '|' && ts[0] != '='))
    throw py::type_error(name + ": unsupported typestr (little-endian types only, e.g. '<f4')");
  a.kind = ts[1];
  a.itemsize = std::atoi(ts + 2);
  if (!PyTuple_Check(data) || PyTuple_GET_SIZE(data) != 2)
    throw py::type_error(name + ": __cuda_array_interface__ data must be a (pointer, read_only) tuple");
  PyObject* ptr = PyTuple_GET_ITEM(data, 0);
  if (ptr != Py_None) {
    a.ptr = static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(ptr));
    if (PyErr_Occurred()) {
      PyErr_Clear();
      throw py::type_error(name + ": the data pointer must be an integer");
    }
  }
  a.readonly = PyObject_IsTrue(PyTuple_GET_ITEM(data, 1)) == 1;
  PyObject* mask = PyDict_GetItem(dict, keys.mask.ptr());
  if (mask != nullptr && mask != Py_None) throw py::value_error(name + ": masked arrays are not supported");
  PyObject* strides = PyDict_GetItem(dict, keys.strides.ptr());
  if (strides != nullptr && strides != Py_None) {
    if (!PyTuple_Check(strides) || PyTuple_GET_SIZE(strides) != rank)
      throw py::value_error(name + ": strides must be None or a tuple with one entry per dimension");
    int64_t expected = a.itemsize;
    for (Py_ssize_t i = rank; i-- > 0;) {
      if (a.shape[i] != 1 && ToInt64(PyTuple_GET_ITEM(strides, i), name, "strides") != expected)
        throw py::value_error(name + " must be C-contiguous (got strides that are not)");
      expected *= a.shape[i];
    }
  }
  if (a.ptr == 0 && a.size > 0) throw py::value_error(name + " has a null data pointer");
  return a;
}

lbe::DType DeviceDType(const DeviceArray& a, const std::string& name, const std::optional<std::string>& override) {
  if (override) {
    const std::optional<lbe::DType> dt = lbe::ParseDType(*override);
    if (!dt) throw py::value_error("dtype must be float16, bfloat16, float32 or float64, got '" + *override + "'");
    if (a.itemsize != lbe::DTypeSize(*dt))
      throw py::type_error(name + " has " + std::to_string(a.itemsize) + "-byte elements; dtype=" + *override +
                           " needs " + std::to_string(lbe::DTypeSize(*dt)));
    return *dt;
  }
  if (a.kind == 'f' && a.itemsize == 2) return lbe::DType::kFloat16;
  if (a.kind == 'f' && a.itemsize == 4) return lbe::DType::kFloat32;
  if (a.kind == 'f' && a.itemsize == 8) return lbe::DType::kFloat64;
  throw py::type_error(name + " has typestr kind '" + std::string(1, a.kind) + "' and " +
                       std::to_string(a.itemsize) + "-byte elements; expected float16, float32 or float64 "
                       "(bfloat16: pass dtype='bfloat16')");
}

void CheckDevice(const DeviceArray& a, const std::string& name, lbe::DType dtype, bool stats, int64_t size,
                 bool writable) {
  const int want = stats ? lbe::StatsSize(dtype) : lbe::DTypeSize(dtype);
  if (a.itemsize != want || (a.kind != 'f' && !(dtype == lbe::DType::kBFloat16 && !stats)))
    throw py::type_error(name + " must hold " +
                         (stats ? std::string(dtype == lbe::DType::kFloat64 ? "float64" : "float32")
                                : std::string(lbe::DTypeName(dtype))) +
                         " elements");
  if (a.size != size)
    throw py::value_error(name + " has " + std::to_string(a.size) + " elements; expected " + std::to_string(size));
  if (writable && a.readonly) throw py::value_error(name + " is read-only");
}

// Reads the activations into *in (whose ddof is set).
void ReadDeviceActivations(py::handle xs_obj, const std::optional<std::string>& dtype, lbe::Activations* in) {
  py::sequence seq = CheckList(xs_obj, "xs", std::nullopt);
  if (seq.size() == 0) throw py::value_error("xs must not be empty");
  for (size_t i = 0; i < seq.size(); ++i) {
    const std::string name = Indexed("xs", i);
    DeviceArray a = ReadDeviceArray(seq[i], name);
    AddActivation(a.shape, reinterpret_cast<const void*>(a.ptr), DeviceDType(a, name, dtype), "xs", i, in);
  }
}

std::vector<void*> DeviceOutputs(py::handle obj, const std::string& name, const lbe::Activations& in, bool stats) {
  py::sequence seq = CheckList(obj, name, in.batch.size());
  std::vector<void*> ptrs;
  for (size_t i = 0; i < in.batch.size(); ++i) {
    DeviceArray a = ReadDeviceArray(seq[i], Indexed(name, i));
    CheckDevice(a, Indexed(name, i), in.dtype, stats, stats ? in.units[i] : in.batch[i] * in.units[i], true);
    ptrs.push_back(reinterpret_cast<void*>(a.ptr));
  }
  return ptrs;
}

std::vector<const void*> DeviceStatsInputs(py::handle obj, const std::string& name, const lbe::Activations& in,
                                           bool optional) {
  std::vector<const void*> ptrs(in.batch.size(), nullptr);
  if (optional && obj.is_none()) return ptrs;
  py::sequence seq = CheckList(obj, name, in.batch.size());
  for (size_t i = 0; i < in.batch.size(); ++i) {
    if (optional && seq[i].is_none()) continue;
    DeviceArray a = ReadDeviceArray(seq[i], Indexed(name, i));
    CheckDevice(a, Indexed(name, i), in.dtype, true, in.units[i], false);
    ptrs[i] = reinterpret_cast<const void*>(a.ptr);
  }
  return ptrs;
}

void ThrowCuda(cudaError_t err, const char* what) {
  throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// Runs `launch` with the caller's workspace, or with one from the stream-ordered allocator.
template <typename Launch>
void WithWorkspace(const char* what, py::handle workspace_obj, size_t need, uintptr_t stream_handle,
                   const Launch& launch) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (!workspace_obj.is_none()) {
    DeviceArray ws = ReadDeviceArray(workspace_obj, "workspace");
    const size_t have = static_cast<size_t>(ws.size) * static_cast<size_t>(ws.itemsize);
    if (have < need)
      throw py::value_error("workspace has " + std::to_string(have) + " bytes; this call needs " + std::to_string(need));
    if (ws.ptr % 16 != 0) throw py::value_error("workspace must be 16-byte aligned");
    cudaError_t err;
    {
      py::gil_scoped_release release;
      err = launch(reinterpret_cast<void*>(ws.ptr), have, stream);
    }
    if (err != cudaSuccess) ThrowCuda(err, what);
    return;
  }
  void* ws = nullptr;
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = need > 0 ? cudaMallocAsync(&ws, need, stream) : cudaSuccess;
    if (err == cudaSuccess) {
      err = launch(ws, need, stream);
      if (ws != nullptr) {
        const cudaError_t free_err = cudaFreeAsync(ws, stream);
        if (err == cudaSuccess) err = free_err;
      }
    }
  }
  if (err != cudaSuccess) ThrowCuda(err, what);
}

void FillForward(lbe::ForwardCall& c, py::handle xs, py::handle means, py::handle variances, py::handle entropies,
                 py::handle mean_residuals, int64_t ddof, const std::optional<std::string>& dtype) {
  c.in.ddof = CheckDdof(ddof);
  ReadDeviceActivations(xs, dtype, &c.in);
  c.mean = DeviceOutputs(means, "means", c.in, true);
  c.variance = DeviceOutputs(variances, "variances", c.in, true);
  if (!mean_residuals.is_none()) c.mean_residual = DeviceOutputs(mean_residuals, "mean_residuals", c.in, true);
  DeviceArray e = ReadDeviceArray(entropies, "entropies");
  CheckDevice(e, "entropies", c.in.dtype, false, c.in.size(), true);
  c.entropy = reinterpret_cast<void*>(e.ptr);
}

void FillBackward(lbe::BackwardCall& c, py::handle xs, py::handle means, py::handle variances,
                  py::handle grad_entropies, py::handle dxs, py::handle grad_means, py::handle grad_variances,
                  py::handle mean_residuals, int64_t ddof, const std::optional<std::string>& dtype) {
  c.in.ddof = CheckDdof(ddof);
  ReadDeviceActivations(xs, dtype, &c.in);
  c.mean = DeviceStatsInputs(means, "means", c.in, false);
  c.variance = DeviceStatsInputs(variances, "variances", c.in, false);
  c.grad_mean = DeviceStatsInputs(grad_means, "grad_means", c.in, true);
  c.grad_variance = DeviceStatsInputs(grad_variances, "grad_variances", c.in, true);
  c.mean_residual = DeviceStatsInputs(mean_residuals, "mean_residuals", c.in, true);
  c.dx = DeviceOutputs(dxs, "dxs", c.in, false);
  DeviceArray g = ReadDeviceArray(grad_entropies, "grad_entropies");
  CheckDevice(g, "grad_entropies", c.in.dtype, false, c.in.size(), false);
  c.grad_entropy = reinterpret_cast<const void*>(g.ptr);
}
#endif

// Plans of the CUDA kernels for given shapes (no device needed): what the launch would look like.
py::dict PlanInfo(const std::vector<std::vector<int64_t>>& shapes, const std::string& dtype_name, int64_t ddof,
                  bool aligned) {
  const std::optional<lbe::DType> dtype = lbe::ParseDType(dtype_name);
  if (!dtype) throw py::value_error("dtype must be float16, bfloat16, float32 or float64");
  lbe::ForwardCall fc;
  fc.in.ddof = CheckDdof(ddof);
  const size_t n = shapes.size();
  if (n == 0) throw py::value_error("shapes must not be empty");
  // Stand-in device addresses: 256-byte aligned, or 2 bytes off when !aligned.
  std::vector<void*> outs(n);
  for (size_t i = 0; i < n; ++i) {
    const void* x = reinterpret_cast<const void*>(uintptr_t{1} << 40 | (i << 32) | (aligned ? 0 : 2));
    AddActivation(shapes[i], x, *dtype, "shapes", i, &fc.in);
    outs[i] = reinterpret_cast<void*>(uintptr_t{1} << 41 | (i << 32) | (aligned ? 0 : 2));
  }
  fc.mean = fc.variance = outs;
  fc.entropy = outs[0];
  lbe::BackwardCall bc;
  bc.in = fc.in;
  bc.mean = bc.variance = std::vector<const void*>(outs.begin(), outs.end());
  bc.grad_entropy = outs[0];
  bc.dx = outs;
  const lbe::ForwardArgs fa = fc.Args();
  const lbe::BackwardArgs ba = bc.Args();
  const std::vector<int64_t>& units = fc.in.units;
  const lbe::cuda::Tuning tuning = lbe::cuda::GetTuning();
  lbe::cuda::ForwardPlan fp;
  lbe::cuda::BackwardPlan bp;
  std::string error = lbe::cuda::MakeForwardPlan(fa, tuning, &fp);
  if (error.empty()) error = lbe::cuda::MakeBackwardPlan(ba, tuning, &bp);
  if (!error.empty()) throw py::value_error(error);
  py::list fwd, bwd;
  for (size_t i = 0; i < n; ++i) {
    const lbe::cuda::ForwardTensor& f = fp.tensors[i];
    const int vec = f.vectorized ? lbe::cuda::VectorWidth(*dtype) : 1;
    py::dict d;
    d["threads_per_row"] = 1 << f.log2_threads_per_row;
    d["units_per_thread"] = vec;
    d["tile_units"] = int64_t{vec} << f.log2_threads_per_row;
    d["tiles"] = f.tiles;
    d["splits"] = f.splits;
    d["rows_per_split"] = f.rows_per_split;
    d["items"] = int64_t{f.tiles} * f.splits;
    fwd.append(d);
    const lbe::cuda::BackwardTensor& b = bp.tensors[i];
    const int bvec = b.vectorized ? lbe::cuda::VectorWidth(*dtype) : 1;
    const int64_t tile_units = int64_t{bvec} << b.log2_threads_per_row;
    py::dict e;
    e["threads_per_row"] = 1 << b.log2_threads_per_row;
    e["units_per_thread"] = bvec;
    e["tile_units"] = tile_units;
    e["tiles"] = (units[i] + tile_units - 1) / tile_units;
    e["splits"] = b.splits;
    e["rows_per_split"] = b.rows_per_split;
    bwd.append(e);
  }
  py::dict out;
  out["forward"] = fwd;
  out["backward"] = bwd;
  out["forward_items"] = fp.num_items;
  out["backward_items"] = bp.num_items;
  out["forward_workspace_bytes"] = fp.workspace_bytes;
  out["backward_workspace_bytes"] = bp.workspace_bytes;
  return out;
}

py::dict TuningDict(const lbe::cuda::Tuning& t) {
  py::dict d;
  d["forward_target_items"] = t.forward_target_items;
  d["forward_min_chunks"] = t.forward_min_chunks;
  d["forward_max_splits"] = t.forward_max_splits;
  d["backward_target_items"] = t.backward_target_items;
  d["backward_min_chunks"] = t.backward_min_chunks;
  d["row_segment_bytes"] = t.row_segment_bytes;
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lbe-ops core kernels (batch entropy forward/backward) on numpy and CUDA arrays, without TensorFlow.";

  m.def("isa", []() { return std::string(lbe::cpu::IsaName()); },
        "Instruction set the CPU kernels dispatch to on this machine ('avx2' or 'generic').");

  m.def(
      "forward",
      [](py::handle xs, int64_t ddof) {
        return HostForward(xs, ddof, [](const lbe::ForwardArgs& a) { return lbe::cpu::Forward(a, lbe::cpu::SerialFor()); });
      },
      py::arg("xs"), py::arg("ddof") = 1,
      "CPU forward on a list of numpy arrays [batch, units...] of one dtype (float16, bfloat16 via ml_dtypes, "
      "float32, float64). Returns (entropies[n] in the input dtype, means, variances, mean_residuals), the statistics "
      "shaped like x.shape[1:] in float32 (float64 for float64 inputs); mean_residuals[i] is the exact mean minus "
      "means[i], for backward.");

  m.def(
      "backward",
      [](py::handle xs, py::handle means, py::handle variances, py::handle grad_entropies, py::handle grad_means,
         py::handle grad_variances, int64_t ddof, py::handle mean_residuals) {
        return HostBackward(xs, means, variances, grad_entropies, grad_means, grad_variances, mean_residuals, ddof,
                            [](const lbe::BackwardArgs& a) { return lbe::cpu::Backward(a, lbe::cpu::SerialFor()); });
      },
      py::arg("xs"), py::arg("means"), py::arg("variances"), py::arg("grad_entropies"),
      py::arg("grad_means") = py::none(), py::arg("grad_variances") = py::none(), py::arg("ddof") = 1,
      py::arg("mean_residuals") = py::none(),
      "CPU backward: dx for each x given the forward's statistics and the gradients of the entropies (and "
      "optionally of the means and variances, and the forward's mean_residuals; None or None entries are zero). "
      "Returns a list of dx.");

  m.def(
      "_emulate_cuda_forward",
      [](py::handle xs, int64_t ddof, int block_order, uint64_t seed) {
        const lbe::cuda::emulation::Options options = EmulationOptions(block_order, seed);
        lbe::cuda::emulation::Report report;
        py::tuple out = HostForward(xs, ddof, [&](const lbe::ForwardArgs& a) {
          report = lbe::cuda::emulation::Forward(a, lbe::cuda::GetTuning(), options);
          return report.error;
        });
        return py::make_tuple(out[0], out[1], out[2], out[3], ReportDict(report));
      },
      py::arg("xs"), py::arg("ddof") = 1, py::arg("block_order") = 0, py::arg("seed") = 0,
      "Runs the CUDA forward kernel's code on the CPU (each block's threads as fibers, every memory access "
      "checked), for testing without a GPU. Returns (entropies, means, variances, mean_residuals, info).");

  m.def(
      "_emulate_cuda_backward",
      [](py::handle xs, py::handle means, py::handle variances, py::handle grad_entropies, py::handle grad_means,
         py::handle grad_variances, int64_t ddof, int block_order, uint64_t seed, py::handle mean_residuals) {
        const lbe::cuda::emulation::Options options = EmulationOptions(block_order, seed);
        lbe::cuda::emulation::Report report;
        py::list dxs = HostBackward(xs, means, variances, grad_entropies, grad_means, grad_variances, mean_residuals,
                                    ddof,
                                    [&](const lbe::BackwardArgs& a) {
                                      report = lbe::cuda::emulation::Backward(a, lbe::cuda::GetTuning(), options);
                                      return report.error;
                                    });
        return py::make_tuple(dxs, ReportDict(report));
      },
      py::arg("xs"), py::arg("means"), py::arg("variances"), py::arg("grad_entropies"),
      py::arg("grad_means") = py::none(), py::arg("grad_variances") = py::none(), py::arg("ddof") = 1,
      py::arg("block_order") = 0, py::arg("seed") = 0, py::arg("mean_residuals") = py::none(),
      "Runs the CUDA backward kernel's code on the CPU (see _emulate_cuda_forward). Returns (dxs, info).");

  m.def("_cuda_plan", &PlanInfo, py::arg("shapes"), py::arg("dtype") = "float32", py::arg("ddof") = 1,
        py::arg("aligned") = true,
        "How the CUDA kernels would cut these shapes into blocks (tiles, batch splits, workspace). No GPU needed.");

  m.def("_cuda_tuning", []() { return TuningDict(lbe::cuda::GetTuning()); },
        "The CUDA kernels' work-cutting knobs (for benchmarking).");
  m.def(
      "_set_cuda_tuning",
      [](py::kwargs kwargs) {
        lbe::cuda::Tuning t = lbe::cuda::GetTuning();
        for (auto item : kwargs) {
          const std::string key = py::str(item.first);
          const int64_t value = item.second.cast<int64_t>();
          if (key == "forward_target_items") t.forward_target_items = value;
          else if (key == "forward_min_chunks") t.forward_min_chunks = value;
          else if (key == "forward_max_splits") t.forward_max_splits = value;
          else if (key == "backward_target_items") t.backward_target_items = value;
          else if (key == "backward_min_chunks") t.backward_min_chunks = value;
          else if (key == "row_segment_bytes") t.row_segment_bytes = value;
          else throw py::type_error("unknown tuning knob '" + key + "'");
        }
        const std::string error = lbe::cuda::SetTuning(t);
        if (!error.empty()) throw py::value_error(error);
        return TuningDict(t);
      },
      "Sets knobs of _cuda_tuning() (for benchmarking; affects later calls in this process). Returns the new set.");
  m.attr("_default_cuda_tuning") = TuningDict(lbe::cuda::Tuning{});

#if defined(LBE_OPS_HAVE_CUDA)
  m.def("has_cuda", []() { return true; }, "Whether this module was built with the CUDA kernels.");
  m.def(
      "cuda_device_count",
      []() {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) {
          (void)cudaGetLastError();
          return 0;
        }
        return count;
      },
      "Number of CUDA devices this process can use (0 without a driver or device).");
  m.def(
      "cuda_forward_workspace_bytes",
      [](py::handle xs, py::handle means, py::handle variances, py::handle entropies, int64_t ddof,
         std::optional<std::string> dtype, py::handle mean_residuals) {
        lbe::ForwardCall c;
        FillForward(c, xs, means, variances, entropies, mean_residuals, ddof, dtype);
        return lbe::cuda::ForwardWorkspaceBytes(c.Args());
      },
      py::arg("xs"), py::arg("means"), py::arg("variances"), py::arg("entropies"), py::arg("ddof") = 1,
      py::arg("dtype") = py::none(), py::arg("mean_residuals") = py::none(),
      "Device scratch bytes cuda_forward needs for these arrays.");
  m.def(
      "cuda_forward",
      [](py::handle xs, py::handle means, py::handle variances, py::handle entropies, int64_t ddof, uintptr_t stream,
         py::handle workspace, std::optional<std::string> dtype, py::handle mean_residuals) {
        lbe::ForwardCall c;
        FillForward(c, xs, means, variances, entropies, mean_residuals, ddof, dtype);
        const lbe::ForwardArgs args = c.Args();
        const size_t need = lbe::cuda::ForwardWorkspaceBytes(args);
        WithWorkspace("cuda_forward", workspace, need, stream, [&](void* ws, size_t bytes, cudaStream_t s) {
          return lbe::cuda::Forward(args, ws, bytes, s);
        });
      },
      py::arg("xs"), py::arg("means"), py::arg("variances"), py::arg("entropies"), py::arg("ddof") = 1,
      py::arg("stream") = 0, py::arg("workspace") = py::none(), py::arg("dtype") = py::none(),
      py::arg("mean_residuals") = py::none(),
      "CUDA forward, enqueued on `stream` (a cudaStream_t as an int; 0 is the legacy default stream). xs: device "
      "arrays [batch, units...] with __cuda_array_interface__ (or such dicts), C-contiguous; writes means[i] and "
      "variances[i] (units elements each, float32 or float64 for float64 inputs), mean_residuals[i] when given "
      "(the exact mean minus means[i], for cuda_backward) and entropies (one per tensor, input dtype). workspace: a device array of at least cuda_forward_workspace_bytes bytes, or None to take one "
      "from the stream-ordered allocator. dtype='bfloat16' reads 2-byte arrays as bfloat16.");
  m.def(
      "cuda_backward_workspace_bytes",
      [](py::handle xs, py::handle means, py::handle variances, py::handle grad_entropies, py::handle dxs,
         py::handle grad_means, py::handle grad_variances, int64_t ddof, std::optional<std::string> dtype,
         py::handle mean_residuals) {
        lbe::BackwardCall c;
        FillBackward(c, xs, means, variances, grad_entropies, dxs, grad_means, grad_variances, mean_residuals, ddof,
                     dtype);
        return lbe::cuda::BackwardWorkspaceBytes(c.Args());
      },
      py::arg("xs"), py::arg("means"), py::arg("variances"), py::arg("grad_entropies"), py::arg("dxs"),
      py::arg("grad_means") = py::none(), py::arg("grad_variances") = py::none(), py::arg("ddof") = 1,
      py::arg("dtype") = py::none(), py::arg("mean_residuals") = py::none(),
      "Device scratch bytes cuda_backward needs for these arrays.");
  m.def(
      "cuda_backward",
      [](py::handle xs, py::handle means, py::handle variances, py::handle grad_entropies, py::handle dxs,
         py::handle grad_means, py::handle grad_variances, int64_t ddof, uintptr_t stream, py::handle workspace,
         std::optional<std::string> dtype, py::handle mean_residuals) {
        lbe::BackwardCall c;
        FillBackward(c, xs, means, variances, grad_entropies, dxs, grad_means, grad_variances, mean_residuals, ddof,
                     dtype);
        const lbe::BackwardArgs args = c.Args();
        const size_t need = lbe::cuda::BackwardWorkspaceBytes(args);
        WithWorkspace("cuda_backward", workspace, need, stream, [&](void* ws, size_t bytes, cudaStream_t s) {
          return lbe::cuda::Backward(args, ws, bytes, s);
        });
      },
      py::arg("xs"), py::arg("means"), py::arg("variances"), py::arg("grad_entropies"), py::arg("dxs"),
      py::arg("grad_means") = py::none(), py::arg("grad_variances") = py::none(), py::arg("ddof") = 1,
      py::arg("stream") = 0, py::arg("workspace") = py::none(), py::arg("dtype") = py::none(),
      py::arg("mean_residuals") = py::none(),
      "CUDA backward, enqueued on `stream`: writes dxs[i] (shaped like xs[i]) from the forward's means and "
      "variances and grad_entropies (one per tensor, input dtype); grad_means / grad_variances / mean_residuals "
      "may be None or hold None entries (zero).");
#else
  m.def("has_cuda", []() { return false; }, "Whether this module was built with the CUDA kernels.");
  m.def("cuda_device_count", []() { return 0; }, "Number of CUDA devices (0: built without CUDA).");
#endif
}
