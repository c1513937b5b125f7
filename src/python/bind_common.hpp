// Shared pieces of the Python extension `ringattn._C`.
//
// The pure-Python layer (src/python/ringattn/_tensor.py) turns every torch.Tensor or
// numpy.ndarray argument into a TensorArg: the caller's data pointer, dtype, shape and
// strides (in elements). The bindings read and write the caller's memory in place
// through it; the Python objects stay alive for the whole call because the Python
// wrapper holds them. Kernels run with the GIL released.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ringattn/dtype.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"

namespace ringattn::python {

namespace py = pybind11;

// Element types a TensorArg can carry: the attention storage dtypes and the index types.
enum class ElemType : std::uint8_t { kF32, kBF16, kF16, kFP8E4M3, kI32, kI64, kU8 };

// "fp32" | "bf16" | "fp16" | "fp8" | "i32" | "i64" | "u8".
ElemType parse_elem_type(const std::string& name);
const char* elem_type_name(ElemType t);
// The attention storage dtype of a float element type (InvalidArgument for index types).
DType storage_dtype(ElemType t, const std::string& what);

// One tensor argument: where it lives and how it is laid out (strides in elements).
struct TensorArg {
  std::string name;  // the Python argument name, for error messages
  std::uintptr_t ptr = 0;
  ElemType type = ElemType::kF32;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> strides;

  int ndim() const { return static_cast<int>(shape.size()); }
  std::int64_t dim(int i) const { return shape.at(i < 0 ? i + ndim() : i); }
  std::int64_t stride(int i) const { return strides.at(i < 0 ? i + ndim() : i); }
  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(ptr);
  }
  // Throws InvalidArgument naming the tensor unless it has `n` dims.
  void expect_ndim(int n, const char* shape_text) const;
  // Throws InvalidArgument naming the tensor unless dim i == want.
  void expect_dim(int i, std::int64_t want, const char* what) const;
  // Throws InvalidArgument unless every stride is the C-contiguous one.
  void expect_contiguous() const;
};

// TensorArg over a torch.Tensor or numpy.ndarray `x` without copying (tensor_arg.cpp):
// checks the kind, CPU device, element type (one of `types`, names as elem_type_name),
// rank (`ndim` >= 0), contiguous last dim and non-negative strides. Throws TypeError /
// ValueError naming `name`.
TensorArg tensor_arg(py::handle x, const std::string& name, const py::tuple& types, int ndim,
                     const std::string& shape_text);

// True for a torch.Tensor or numpy.ndarray; true when `a` and `b` are both torch tensors
// or both numpy arrays.
bool is_tensor(py::handle x);
bool same_tensor_kind(py::handle a, py::handle b);
// True for a numpy array that may not be written.
bool is_readonly_array(py::handle x);
// TensorArg of a tensor this module just made with empty_tensor (C-contiguous, of that
// shape and type): only its data pointer is asked for.
TensorArg fresh_tensor_arg(py::handle x, const std::string& name,
                           const std::vector<std::int64_t>& shape, ElemType type);
// An uninitialised tensor of `ref`'s kind (torch or numpy), C-contiguous.
py::object empty_tensor(py::handle ref, const std::vector<std::int64_t>& shape, ElemType type);

// Mask / score options of every attention binding (docs/semantics.md section 1).
MaskParams mask_params(float scale, bool causal, int window_left, int window_right, float softcap);

// Attention-sink logits [h] fp32 contiguous (sinks / s_aux), or nullptr when absent;
// InvalidArgument naming the tensor on another dtype, rank or length.
inline const float* sinks_data(const std::optional<TensorArg>& sinks, int h) {
  if (!sinks) return nullptr;
  RA_CHECK_ARG(sinks->type == ElemType::kF32,
               sinks->name << ": expected fp32, got " << elem_type_name(sinks->type));
  sinks->expect_ndim(1, "[h]");
  sinks->expect_dim(0, h, "query heads");
  sinks->expect_contiguous();
  return sinks->data<const float>();
}

// The process-wide engine of the Python package: backend chosen once (set_backend
// replaces it), thread count from set_num_threads. Readers take a shared_ptr copy, so
// a call in flight keeps its engine even if another thread switches backends.
std::shared_ptr<const Engine> engine();
void set_backend(const std::string& name);
std::string backend_name();
void set_num_threads(int n);
int num_threads();

// Runs `kernel` (a call into the engine or the ring) with the GIL released and records
// its duration for last_kernel_seconds(): the Python overhead of a call is its wall
// time minus this (launch/bench_python.py).
void record_kernel_seconds(double seconds);
double last_kernel_seconds();
template <typename F>
void run_kernel(F&& kernel) {
  py::gil_scoped_release release;
  const auto t0 = std::chrono::steady_clock::now();
  kernel();
  record_kernel_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

// Registration of each group of bindings (one file each).
void register_core(py::module_& m);       // module_core.cpp: exceptions, engine, merge
void register_attention(py::module_& m);  // bind_attention.cpp: FA3 forward, KV cache
void register_mla(py::module_& m);        // bind_mla.cpp: FlashMLA decode, sparse prefill
void register_ring(py::module_& m);       // bind_ring.cpp: ring attention, distributed decode
void register_session(py::module_& m);    // bind_session.cpp: sharded-KV-cache sessions

}  // namespace ringattn::python
