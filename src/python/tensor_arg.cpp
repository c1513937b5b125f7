// _C.tensor_arg: a TensorArg over a torch.Tensor or numpy.ndarray, with the checks
// every entry point needs (kind, CPU device, element type, rank, contiguous last dim,
// no negative strides). It sits on every call's path, so it is written in C++: the
// same checks in Python cost about 2 us per tensor, which a decode call pays 6 times.
// Errors: TypeError for the kind or element type, ValueError for the rest, each naming
// the argument.
// Python.h (through pybind11) comes before every other header: Python's configuration sets
// feature macros that the C and C++ standard headers read, and every translation unit of
// the module must see the same ones.
// clang-format off
#include <pybind11/pybind11.h>
// clang-format on

#include <pybind11/numpy.h>

#include <algorithm>
#include <sstream>

#include "bind_common.hpp"

namespace ringattn::python {

namespace {

// torch.Tensor and torch's dtype objects, looked up once the caller has imported torch
// (this module never imports torch itself). Leaked on purpose: they must outlive the
// interpreter's teardown order.
struct TorchTypes {
  py::object tensor_cls;
  std::vector<std::pair<PyObject*, ElemType>> dtypes;
};

const TorchTypes* torch_types() {
  static TorchTypes* cached = nullptr;
  if (cached) return cached;
  py::object torch = py::module_::import("sys").attr("modules").attr("get")("torch");
  if (torch.is_none()) return nullptr;
  auto* t = new TorchTypes;
  t->tensor_cls = torch.attr("Tensor");
  const std::pair<const char*, ElemType> names[] = {{"float32", ElemType::kF32},
                                                    {"bfloat16", ElemType::kBF16},
                                                    {"float16", ElemType::kF16},
                                                    {"int32", ElemType::kI32},
                                                    {"int64", ElemType::kI64},
                                                    {"uint8", ElemType::kU8},
                                                    {"float8_e4m3fn", ElemType::kFP8E4M3}};
  for (const auto& [name, type] : names) {
    if (py::hasattr(torch, name)) {
      py::object dt = torch.attr(name);
      t->dtypes.emplace_back(dt.release().ptr(), type);  // kept alive
    }
  }
  cached = t;
  return cached;
}

// numpy dtype strings accepted (native little-endian only).
bool numpy_elem_type(const std::string& str, ElemType& out) {
  static const std::pair<const char*, ElemType> table[] = {{"<f4", ElemType::kF32},
                                                           {"<f2", ElemType::kF16},
                                                           {"<i4", ElemType::kI32},
                                                           {"<i8", ElemType::kI64},
                                                           {"|u1", ElemType::kU8}};
  for (const auto& [s, t] : table) {
    if (str == s) {
      out = t;
      return true;
    }
  }
  return false;
}

std::string list_text(const std::vector<std::int64_t>& v) {
  std::ostringstream os;
  os << "[";
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

}  // namespace

bool is_tensor(py::handle x) {
  const TorchTypes* torch = torch_types();
  return (torch && py::isinstance(x, torch->tensor_cls)) || py::isinstance<py::array>(x);
}

bool same_tensor_kind(py::handle a, py::handle b) {
  const TorchTypes* torch = torch_types();
  const bool ta = torch && py::isinstance(a, torch->tensor_cls);
  const bool tb = torch && py::isinstance(b, torch->tensor_cls);
  if (ta || tb) return ta && tb;
  return py::isinstance<py::array>(a) && py::isinstance<py::array>(b);
}

TensorArg fresh_tensor_arg(py::handle x, const std::string& name,
                           const std::vector<std::int64_t>& shape, ElemType type) {
  TensorArg t;
  t.name = name;
  t.type = type;
  t.shape = shape;
  t.strides.assign(shape.size(), 1);
  for (int i = static_cast<int>(shape.size()) - 2; i >= 0; --i)
    t.strides[static_cast<std::size_t>(i)] =
        t.strides[static_cast<std::size_t>(i) + 1] * std::max<std::int64_t>(shape[i + 1], 1);
  if (py::isinstance<py::array>(x)) {
    t.ptr = reinterpret_cast<std::uintptr_t>(py::reinterpret_borrow<py::array>(x).data());
  } else {
    t.ptr = x.attr("data_ptr")().cast<std::uintptr_t>();
  }
  return t;
}

bool is_readonly_array(py::handle x) {
  return py::isinstance<py::array>(x) && !py::reinterpret_borrow<py::array>(x).writeable();
}

py::object empty_tensor(py::handle ref, const std::vector<std::int64_t>& shape, ElemType type) {
  py::tuple dims(shape.size());
  for (std::size_t i = 0; i < shape.size(); ++i) dims[i] = py::int_(shape[i]);
  const TorchTypes* torch = torch_types();
  if (torch && py::isinstance(ref, torch->tensor_cls)) {
    static PyObject* empty = nullptr;  // torch.empty, kept alive for the process
    if (!empty) {
      py::object fn = py::module_::import("sys").attr("modules").attr("get")("torch").attr("empty");
      empty = fn.release().ptr();
    }
    for (const auto& [obj, t] : torch->dtypes) {
      if (t == type) {
        return py::reinterpret_borrow<py::object>(empty)(dims, py::arg("dtype") = py::handle(obj));
      }
    }
    throw py::type_error(std::string("torch has no dtype for ") + elem_type_name(type));
  }
  const char* np_name = nullptr;
  switch (type) {
    case ElemType::kF32:
      np_name = "float32";
      break;
    case ElemType::kF16:
      np_name = "float16";
      break;
    case ElemType::kI32:
      np_name = "int32";
      break;
    default:
      throw py::type_error(std::string("numpy has no dtype for ") + elem_type_name(type) +
                           ": pass torch tensors");
  }
  return py::array(py::dtype(np_name), std::vector<py::ssize_t>(shape.begin(), shape.end()));
}

TensorArg tensor_arg(py::handle x, const std::string& name, const py::tuple& types, int ndim,
                     const std::string& shape_text) {
  TensorArg t;
  t.name = name;
  const TorchTypes* torch = torch_types();
  if (torch && py::isinstance(x, torch->tensor_cls)) {
    PyObject* dtype = x.attr("dtype").ptr();
    bool known = false;
    for (const auto& [obj, type] : torch->dtypes) {
      if (obj == dtype) {
        t.type = type;
        known = true;
        break;
      }
    }
    if (!known) {
      throw py::type_error(name + ": unsupported dtype " +
                           py::str(x.attr("dtype")).cast<std::string>());
    }
    if (!x.attr("is_cpu").cast<bool>()) {
      throw py::value_error(name + ": must be a CPU tensor, got device " +
                            py::str(x.attr("device")).cast<std::string>());
    }
    t.ptr = x.attr("data_ptr")().cast<std::uintptr_t>();
    for (py::handle s : x.attr("shape")) t.shape.push_back(s.cast<std::int64_t>());
    for (py::handle s : x.attr("stride")()) t.strides.push_back(s.cast<std::int64_t>());
  } else if (py::isinstance<py::array>(x)) {
    auto a = py::reinterpret_borrow<py::array>(x);
    if (!numpy_elem_type(py::str(a.dtype().attr("str")).cast<std::string>(), t.type)) {
      throw py::type_error(name + ": unsupported dtype " + py::str(a.dtype()).cast<std::string>());
    }
    const auto item = static_cast<std::int64_t>(a.itemsize());
    t.ptr = reinterpret_cast<std::uintptr_t>(a.data());
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
      const std::int64_t bytes = a.strides(i);
      if (bytes % item) {
        throw py::value_error(name + ": byte stride " + std::to_string(bytes) + " in dim " +
                              std::to_string(i) + " is not a multiple of the item size " +
                              std::to_string(item));
      }
      t.shape.push_back(a.shape(i));
      t.strides.push_back(bytes / item);
    }
  } else {
    throw py::type_error(name + ": expected a torch.Tensor or numpy.ndarray, got " +
                         std::string(Py_TYPE(x.ptr())->tp_name));
  }

  const std::string type_name = elem_type_name(t.type);
  bool accepted = false;
  std::string expected;
  for (py::handle ty : types) {
    const auto s = ty.cast<std::string>();
    accepted = accepted || s == type_name;
    expected += (expected.empty() ? "" : ", ") + s;
  }
  if (!accepted) {
    throw py::type_error(name + ": dtype " + type_name + " not accepted here (expected one of " +
                         expected + ")");
  }
  if (ndim >= 0 && t.ndim() != ndim) {
    throw py::value_error(name + ": expected " + std::to_string(ndim) + " dims " + shape_text +
                          ", got " + std::to_string(t.ndim()) + " (shape " + list_text(t.shape) +
                          ")");
  }
  std::int64_t numel = 1;
  for (std::int64_t n : t.shape) numel *= n;
  if (numel == 0) {  // nothing is read or written: any strides (numpy gives 0s) are fine
    std::int64_t want = 1;
    for (int i = t.ndim() - 1; i >= 0; --i) {
      t.strides[static_cast<std::size_t>(i)] = want;
      want *= std::max<std::int64_t>(t.shape[static_cast<std::size_t>(i)], 1);
    }
  }
  if (t.ndim() && t.shape.back() > 1 && t.strides.back() != 1) {
    throw py::value_error(name + ": last dim must be contiguous (stride 1), got stride " +
                          std::to_string(t.strides.back()));
  }
  for (std::int64_t s : t.strides) {
    if (s < 0) {
      throw py::value_error(name + ": negative strides " + list_text(t.strides) +
                            " are not supported");
    }
  }
  return t;
}

}  // namespace ringattn::python
