// ringattn._C: the extension module. This file holds the module itself, the error
// translation (one Python exception per class of ringattn::Error), the process-wide
// engine (backend and threads), TensorArg, and the softmax-state merge.
// Python.h (through pybind11) comes before every other header: Python's configuration sets
// feature macros that the C and C++ standard headers read, and every translation unit of
// the module must see the same ones.
// clang-format off
#include <pybind11/pybind11.h>
// clang-format on

#include <omp.h>

#include <mutex>
#include <utility>

#include "bind_common.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/version.hpp"

namespace ringattn::python {

ElemType parse_elem_type(const std::string& name) {
  if (name == "fp32") return ElemType::kF32;
  if (name == "bf16") return ElemType::kBF16;
  if (name == "fp16") return ElemType::kF16;
  if (name == "fp8") return ElemType::kFP8E4M3;
  if (name == "i32") return ElemType::kI32;
  if (name == "i64") return ElemType::kI64;
  if (name == "u8") return ElemType::kU8;
  RA_THROW(InvalidArgument, "unknown element type '" << name << "'");
}

const char* elem_type_name(ElemType t) {
  switch (t) {
    case ElemType::kF32:
      return "fp32";
    case ElemType::kBF16:
      return "bf16";
    case ElemType::kF16:
      return "fp16";
    case ElemType::kFP8E4M3:
      return "fp8";
    case ElemType::kI32:
      return "i32";
    case ElemType::kI64:
      return "i64";
    case ElemType::kU8:
      return "u8";
  }
  return "?";
}

DType storage_dtype(ElemType t, const std::string& what) {
  switch (t) {
    case ElemType::kF32:
      return DType::kF32;
    case ElemType::kBF16:
      return DType::kBF16;
    case ElemType::kF16:
      return DType::kF16;
    case ElemType::kFP8E4M3:
      return DType::kFP8E4M3;
    default:
      RA_THROW(InvalidArgument,
               what << ": expected a floating-point tensor, got " << elem_type_name(t));
  }
}

void TensorArg::expect_ndim(int n, const char* shape_text) const {
  RA_CHECK_ARG(ndim() == n,
               name << ": expected " << n << " dims " << shape_text << ", got " << ndim());
}

void TensorArg::expect_dim(int i, std::int64_t want, const char* what) const {
  RA_CHECK_ARG(dim(i) == want,
               name << ": dim " << i << " (" << what << ") must be " << want << ", got " << dim(i));
}

void TensorArg::expect_contiguous() const {
  std::int64_t want = 1;
  for (int i = ndim() - 1; i >= 0; --i) {
    RA_CHECK_ARG(shape[i] == 1 || strides[i] == want, name << ": must be contiguous, got stride "
                                                           << strides[i] << " in dim " << i
                                                           << " where " << want << " was expected");
    want *= shape[i];
  }
}

MaskParams mask_params(float scale, bool causal, int window_left, int window_right, float softcap) {
  MaskParams m;
  m.scale = scale;
  m.causal = causal;
  m.window_left = window_left;
  m.window_right = window_right;
  m.softcap = softcap;
  return m;
}

// ---- the process-wide engine ----

namespace {

struct EngineState {
  std::mutex mu;
  std::string backend = "auto";
  int threads = 0;  // 0 = not set yet: OpenMP's default
  std::shared_ptr<const Engine> engine;
};

EngineState& state() {
  static EngineState s;
  return s;
}

std::shared_ptr<const Engine> make_engine(const std::string& backend, int threads) {
  EngineOptions o;
  o.backend = backend;
  o.threads = threads;
  return std::make_shared<const Engine>(o);
}

}  // namespace

std::shared_ptr<const Engine> engine() {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.engine) {
    if (s.threads == 0) s.threads = omp_get_max_threads();
    s.engine = make_engine(s.backend, s.threads);
  }
  return s.engine;
}

void set_backend(const std::string& name) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.threads == 0) s.threads = omp_get_max_threads();
  s.engine = make_engine(name, s.threads);  // throws before anything changes
  s.backend = name;
}

std::string backend_name() { return engine()->backend_name(); }

void set_num_threads(int n) {
  RA_CHECK_ARG(n >= 1, "set_num_threads: n must be >= 1, got " << n);
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.engine = make_engine(s.backend, n);
  s.threads = n;
}

int num_threads() { return engine()->threads(); }

// ---- timing ----

namespace {
thread_local double g_last_kernel_seconds = 0.0;
}

void record_kernel_seconds(double seconds) { g_last_kernel_seconds = seconds; }
double last_kernel_seconds() { return g_last_kernel_seconds; }

// ---- merge ----

namespace {

// FlashInfer merge_state: v_a, v_b [seq, h, d] fp32, s_a, s_b [seq, h] fp32 (natural
// log) -> v, s of the same shapes (all contiguous; the Python layer checks shapes).
void merge_state_binding(const TensorArg& v_a, const TensorArg& s_a, const TensorArg& v_b,
                         const TensorArg& s_b, const TensorArg& v_out, const TensorArg& s_out) {
  for (const TensorArg* t : {&v_a, &s_a, &v_b, &s_b, &v_out, &s_out}) {
    RA_CHECK_ARG(t->type == ElemType::kF32,
                 t->name << ": expected fp32, got " << elem_type_name(t->type));
    t->expect_contiguous();
  }
  const std::int64_t n = s_a.dim(0) * s_a.dim(1);
  const int d = static_cast<int>(v_a.dim(2));
  run_kernel([&] {
    merge_state(v_a.data<const float>(), s_a.data<const float>(), v_b.data<const float>(),
                s_b.data<const float>(), v_out.data<float>(), s_out.data<float>(), n, d);
  });
}

// merge_states over parts laid out [n, num_states, d] / [n, num_states] (contiguous).
void merge_states_binding(const TensorArg& v, const TensorArg& s, const TensorArg& v_out,
                          const TensorArg& s_out) {
  for (const TensorArg* t : {&v, &s, &v_out, &s_out}) {
    RA_CHECK_ARG(t->type == ElemType::kF32,
                 t->name << ": expected fp32, got " << elem_type_name(t->type));
    t->expect_contiguous();
  }
  const std::int64_t n = v.dim(0);
  const int states = static_cast<int>(v.dim(1));
  const int d = static_cast<int>(v.dim(2));
  run_kernel([&] {
    merge_states(v.data<const float>(), s.data<const float>(), v_out.data<float>(),
                 s_out.data<float>(), n, states, d);
  });
}

}  // namespace

void register_core(py::module_& m) {
  // One Python exception per class of ringattn::Error, each also a standard Python
  // exception so that `except ValueError` works as users expect.
  static py::exception<Error> error(m, "Error", PyExc_RuntimeError);
  static py::exception<InvalidArgument> invalid(m, "InvalidArgument", PyExc_ValueError);
  static py::exception<UnsupportedError> unsupported(m, "UnsupportedError", PyExc_ValueError);
  static py::exception<IoError> io(m, "IoError", PyExc_OSError);
  static py::exception<CommError> comm(m, "CommError", PyExc_RuntimeError);
  static py::exception<ResourceError> resource(m, "ResourceError", PyExc_MemoryError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      PyErr_SetString(invalid.ptr(), e.message().c_str());
    } catch (const UnsupportedError& e) {
      PyErr_SetString(unsupported.ptr(), e.message().c_str());
    } catch (const IoError& e) {
      PyErr_SetString(io.ptr(), e.message().c_str());
    } catch (const CommError& e) {
      PyErr_SetString(comm.ptr(), e.message().c_str());
    } catch (const ResourceError& e) {
      PyErr_SetString(resource.ptr(), e.message().c_str());
    } catch (const Error& e) {
      PyErr_SetString(error.ptr(), e.message().c_str());
    }
  });

  py::class_<TensorArg>(m, "TensorArg")
      .def(py::init([](std::string name, std::uintptr_t ptr, const std::string& type,
                       std::vector<std::int64_t> shape, std::vector<std::int64_t> strides) {
             RA_CHECK_ARG_EQ(shape.size(), strides.size(), name << ": shape and strides");
             TensorArg t;
             t.name = std::move(name);
             t.ptr = ptr;
             t.type = parse_elem_type(type);
             t.shape = std::move(shape);
             t.strides = std::move(strides);
             return t;
           }),
           py::arg("name"), py::arg("ptr"), py::arg("type"), py::arg("shape"), py::arg("strides"))
      .def_readonly("name", &TensorArg::name)
      .def_readonly("ptr", &TensorArg::ptr)
      .def_readonly("shape", &TensorArg::shape)
      .def_readonly("strides", &TensorArg::strides)
      .def_property_readonly("type", [](const TensorArg& t) { return elem_type_name(t.type); });

  m.def("tensor_arg", &tensor_arg, py::arg("x"), py::arg("name"), py::arg("types"), py::arg("ndim"),
        py::arg("shape_text"));
  m.def("version", &version, "Library version, the same string as `ringattn --version`.");
  m.def("set_backend", &set_backend, py::arg("name"));
  m.def("backend", &backend_name);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("get_num_threads", &num_threads);
  m.def("available_backends", &available_backends);
  m.def("cpu_features", &cpu_feature_summary);
  m.def("last_kernel_seconds", &last_kernel_seconds,
        "Seconds the calling thread's last kernel call spent in C++ with the GIL released.");
  m.def("merge_state", &merge_state_binding);
  m.def("merge_states", &merge_states_binding);
}

}  // namespace ringattn::python

PYBIND11_MODULE(_C, m) {
  namespace rp = ringattn::python;
  m.doc() = "ringattn's C++ kernels, merge and ring attention (use the `ringattn` package)";
  rp::register_core(m);
  rp::register_attention(m);
  rp::register_mla(m);
  rp::register_ring(m);
  rp::register_session(m);
}
