// Binding of the sharded-KV-cache session (kv_session.hpp) as _C.KvSession: the
// Python class ringattn.session.KvSession wraps it. The communicator is duplicated from
// the mpi4py handle once, when the session is made, and lives as long as the session.
// Tensor arguments arrive as TensorArg (contiguous; checked here against the config);
// outputs are allocated by the Python layer.
// Python.h (through pybind11) comes before every other header: Python's configuration sets
// feature macros that the C and C++ standard headers read, and every translation unit of
// the module must see the same ones.
// clang-format off
#include <pybind11/pybind11.h>
// clang-format on

#include <mpi.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bind_common.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/kv_session.hpp"

namespace ringattn::python {

namespace {

class PySession {
 public:
  PySession(std::int64_t comm_handle, const std::string& dtype, int b, int h, int h_k, int d,
            int d_v, std::int64_t capacity, int page_size, const std::string& cache_layout,
            const std::string& prefill_layout, float scale, int window_left, float softcap,
            const std::optional<TensorArg>& sinks)
      : engine_(engine()) {
    if (sinks) {  // kept for the session's lifetime (the config points at them)
      const float* x = sinks_data(sinks, h);
      sinks_.assign(x, x + h);
    }
    run_kernel([&] {
      comm_ =
          std::make_unique<comm::Communicator>(MPI_Comm_f2c(static_cast<MPI_Fint>(comm_handle)));
      SessionConfig c;
      comm::run_collectively(*comm_, [&] {
        c.dtype = storage_dtype(parse_elem_type(dtype), "dtype");
        c.layout = parse_cache_layout(cache_layout);
        c.prefill_layout = parse_layout(prefill_layout);
      });
      c.b = b;
      c.h = h;
      c.h_k = h_k;
      c.d = d;
      c.d_v = d_v;
      c.capacity = capacity;
      c.page_size = page_size;
      c.mask.scale = scale;
      c.mask.window_left = window_left;
      c.mask.window_right = 0;
      c.mask.softcap = softcap;
      if (!sinks_.empty()) c.mask.sinks = sinks_.data();
      session_ = std::make_unique<KvSession>(*comm_, *engine_, c);
    });
  }

  // q/k/v: this rank's packed prompt shard [t_r, h|h_k, d|d_v]; out [t_r, h, d_v] fp32,
  // lse [h, t_r] fp32.
  py::dict prefill(const std::vector<std::int64_t>& lens, const TensorArg& q, const TensorArg& k,
                   const TensorArg& v, const TensorArg& out, const TensorArg& lse) {
    const SessionConfig& c = session_->cache().config();
    std::int64_t rows = 0;
    for (auto l : lens) rows += session_->prefill_positions(l).size();
    comm::run_collectively(*comm_, [&] {
      check(q, rows, c.h, c.d, "[t_local, h, d]");
      check(k, rows, c.h_k, c.d, "[t_local, h_k, d]");
      check(v, rows, c.h_k, c.d_v, "[t_local, h_k, d_v]");
    });
    StepStats st;
    run_kernel([&] {
      st = session_->prefill(lens, q.data<const void>(), k.data<const void>(), v.data<const void>(),
                             out.data<float>(), lse.data<float>());
    });
    return stats(st);
  }

  // q/k/v [b, t, h|h_k, d|d_v] identical on every rank; out [b, t, h, d_v], lse [b, h, t].
  py::dict decode(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& out,
                  const TensorArg& lse, int root) {
    const int t = static_cast<int>(q.ndim() == 4 ? q.dim(1) : 0);
    check_step(q, k, v, t);
    StepStats st;
    run_kernel([&] {
      st = session_->decode(t, q.data<const void>(), k.data<const void>(), v.data<const void>(),
                            out.data<float>(), lse.data<float>(), root);
    });
    return stats(st);
  }

  py::dict extend(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& out,
                  const TensorArg& lse, const std::string& mode, int root) {
    const int s1 = static_cast<int>(q.ndim() == 4 ? q.dim(1) : 0);
    ExtendMode m{};
    comm::run_collectively(*comm_, [&] { m = parse_extend_mode(mode); });
    check_step(q, k, v, s1);
    StepStats st;
    ExtendPlan plan;
    run_kernel([&] {
      st = session_->extend(s1, q.data<const void>(), k.data<const void>(), v.data<const void>(),
                            out.data<float>(), lse.data<float>(), m, &plan, root);
    });
    py::dict d = stats(st);
    d["mode"] = extend_mode_name(plan.mode);
    d["why"] = plan.why;
    return d;
  }

  std::vector<std::int64_t> prefill_positions(std::int64_t len) const {
    return session_->prefill_positions(len);
  }
  std::vector<std::int64_t> lengths() const {
    std::vector<std::int64_t> out;
    for (int s = 0; s < session_->cache().config().b; ++s)
      out.push_back(session_->cache().length(s));
    return out;
  }

 private:
  static void check(const TensorArg& t, std::int64_t rows, int heads, int dim, const char* text) {
    t.expect_ndim(3, text);
    t.expect_dim(0, rows, "tokens of this rank's prompt shard");
    t.expect_dim(1, heads, "heads");
    t.expect_dim(2, dim, "head dim");
    t.expect_contiguous();
  }
  void check_step(const TensorArg& q, const TensorArg& k, const TensorArg& v, int t) const {
    const SessionConfig& c = session_->cache().config();
    comm::run_collectively(*comm_, [&] {
      q.expect_ndim(4, "[b, t, h, d]");
      for (const auto* x : {&q, &k, &v}) {
        x->expect_ndim(4, "[b, t, heads, dim]");
        x->expect_dim(0, c.b, "batch");
        x->expect_dim(1, t, "new tokens (q's)");
        x->expect_contiguous();
        RA_CHECK_ARG(storage_dtype(x->type, x->name) == c.dtype,
                     x->name << ": dtype " << elem_type_name(x->type) << " must be the session's "
                             << dtype_name(c.dtype));
      }
      q.expect_dim(2, c.h, "heads");
      q.expect_dim(3, c.d, "head dim");
      k.expect_dim(2, c.h_k, "kv heads");
      k.expect_dim(3, c.d, "head dim");
      v.expect_dim(2, c.h_k, "kv heads");
      v.expect_dim(3, c.d_v, "value head dim");
    });
  }
  static py::dict stats(const StepStats& st) {
    py::dict d;
    d["time_s"] = st.total_s;
    d["compute_s"] = st.compute_s;
    d["merge_s"] = st.merge_s;
    d["bytes"] = st.bytes;
    // Decode: merge_s is the reduction's own cost; wait_s the mean time ranks wait in it
    // for the slowest rank (kv_session.hpp, StepStats).
    d["local_s"] = st.local_s;
    d["reduce_s"] = st.reduce_s;
    d["wait_s"] = st.wait_s;
    d["max_wait_s"] = st.max_wait_s;
    return d;
  }

  std::shared_ptr<const Engine> engine_;
  std::vector<float> sinks_;
  std::unique_ptr<comm::Communicator> comm_;
  std::unique_ptr<KvSession> session_;
};

}  // namespace

void register_session(py::module_& m) {
  py::class_<PySession>(m, "KvSession")
      .def(py::init<std::int64_t, const std::string&, int, int, int, int, int, std::int64_t, int,
                    const std::string&, const std::string&, float, int, float,
                    const std::optional<TensorArg>&>(),
           py::arg("comm"), py::arg("dtype"), py::arg("b"), py::arg("h"), py::arg("h_k"),
           py::arg("d"), py::arg("d_v"), py::arg("capacity"), py::arg("page_size"),
           py::arg("cache_layout"), py::arg("prefill_layout"), py::arg("scale"),
           py::arg("window_left"), py::arg("softcap"), py::arg("sinks") = py::none())
      .def("prefill", &PySession::prefill, py::arg("lens"), py::arg("q"), py::arg("k"),
           py::arg("v"), py::arg("out"), py::arg("lse"))
      .def("decode", &PySession::decode, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
           py::arg("lse"), py::arg("root"))
      .def("extend", &PySession::extend, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
           py::arg("lse"), py::arg("mode"), py::arg("root"))
      .def("prefill_positions", &PySession::prefill_positions, py::arg("len"))
      .def("lengths", &PySession::lengths);
}

}  // namespace ringattn::python
