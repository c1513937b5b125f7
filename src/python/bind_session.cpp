// Binding of the sharded-KV-cache session (kv_session.hpp) as _C.KvSession, of the MLA
// session over a sharded latent cache (mla_session.hpp) as _C.MlaSession, and of the
// one-shot distributed MLA decode (mla_distributed_decode.hpp) as _C.mla_decode_distributed:
// the Python classes ringattn.session.KvSession / MlaSession and ringattn.ring.mla_decode
// wrap them. The communicator is duplicated from
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
#include "ringattn/mla_distributed_decode.hpp"
#include "ringattn/mla_session.hpp"

namespace ringattn::python {

namespace {

py::dict step_stats(const StepStats& st);

// A session's copy of sinks [h] (its config points at it for the session's lifetime);
// empty when absent.
std::vector<float> kept_sinks(const std::optional<TensorArg>& sinks, int h) {
  if (!sinks) return {};
  const float* x = sinks_data(sinks, h);
  return {x, x + h};
}

// The session's own communicator, duplicated from the mpi4py handle.
std::unique_ptr<comm::Communicator> communicator_of(std::int64_t comm_handle) {
  return std::make_unique<comm::Communicator>(MPI_Comm_f2c(static_cast<MPI_Fint>(comm_handle)));
}

class PySession {
 public:
  PySession(std::int64_t comm_handle, const std::string& dtype, int b, int h, int h_k, int d,
            int d_v, std::int64_t capacity, int page_size, const std::string& cache_layout,
            const std::string& prefill_layout, float scale, int window_left, float softcap,
            const std::optional<TensorArg>& sinks, int attention_chunk)
      : engine_(engine()), sinks_(kept_sinks(sinks, h)) {
    run_kernel([&] {
      comm_ = communicator_of(comm_handle);
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
      c.mask.attention_chunk = attention_chunk;  // checked by the session (>= 0)
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
    return step_stats(st);
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
    return step_stats(st);
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
    py::dict d = step_stats(st);
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
  std::shared_ptr<const Engine> engine_;
  std::vector<float> sinks_;
  std::unique_ptr<comm::Communicator> comm_;
  std::unique_ptr<KvSession> session_;
};

py::dict step_stats(const StepStats& st) {
  py::dict d;
  d["time_s"] = st.total_s;
  d["compute_s"] = st.compute_s;
  d["merge_s"] = st.merge_s;
  d["bytes"] = st.bytes;
  d["local_s"] = st.local_s;
  d["reduce_s"] = st.reduce_s;
  d["wait_s"] = st.wait_s;
  d["max_wait_s"] = st.max_wait_s;
  return d;
}

class PyMlaSession {
 public:
  PyMlaSession(std::int64_t comm_handle, const std::string& q_dtype, const std::string& kv_dtype,
               int b, int h_q, std::int64_t capacity, int page_size,
               const std::string& cache_layout, const std::string& prompt_layout, float scale,
               const std::optional<TensorArg>& sinks)
      : engine_(engine()), sinks_(kept_sinks(sinks, h_q)) {
    run_kernel([&] {
      comm_ = communicator_of(comm_handle);
      MlaSessionConfig c;
      comm::run_collectively(*comm_, [&] {
        c.q_dtype = storage_dtype(parse_elem_type(q_dtype), "q dtype");
        c.kv_dtype = storage_dtype(parse_elem_type(kv_dtype), "kv dtype");
        c.layout = parse_cache_layout(cache_layout);
        c.prompt_layout = parse_layout(prompt_layout);
      });
      c.b = b;
      c.h_q = h_q;
      c.capacity = capacity;
      c.page_size = page_size;
      c.scale = scale;
      if (!sinks_.empty()) c.sinks = sinks_.data();
      session_ = std::make_unique<MlaSession>(*comm_, *engine_, c);
    });
  }

  // kv: this rank's packed prompt latents [t_r, 576] (kv dtype); null-free.
  py::dict prefill(const std::vector<std::int64_t>& lens, const TensorArg& kv) {
    const MlaSessionConfig& c = session_->config();
    std::int64_t rows = 0;
    for (auto l : lens) rows += static_cast<std::int64_t>(session_->prefill_positions(l).size());
    comm::run_collectively(*comm_, [&] {
      kv.expect_ndim(2, "[t_local, 576]");
      kv.expect_dim(0, rows, "tokens of this rank's prompt shard");
      kv.expect_dim(1, kMlaHeadDim, "latent dim");
      kv.expect_contiguous();
      check_type(kv, c.kv_dtype);
    });
    StepStats st;
    run_kernel([&] { st = session_->prefill(lens, kv.data<const void>()); });
    return step_stats(st);
  }

  // q [b, s_q, h_q, 576], kv [b, s_q, 576] identical on every rank; out [b, s_q, h_q, 512]
  // fp32, lse [b, h_q, s_q] fp32.
  py::dict decode(const TensorArg& q, const TensorArg& kv, const TensorArg& out,
                  const TensorArg& lse, int root) {
    const MlaSessionConfig& c = session_->config();
    const int s_q = static_cast<int>(q.ndim() == 4 ? q.dim(1) : 0);
    comm::run_collectively(*comm_, [&] {
      q.expect_ndim(4, "[b, s_q, h_q, 576]");
      q.expect_dim(0, c.b, "batch");
      q.expect_dim(2, c.h_q, "query heads");
      q.expect_dim(3, kMlaHeadDim, "head dim (512 latent + 64 rope)");
      kv.expect_ndim(3, "[b, s_q, 576]");
      kv.expect_dim(0, c.b, "batch");
      kv.expect_dim(1, s_q, "new tokens (q's dim 1)");
      kv.expect_dim(2, kMlaHeadDim, "latent dim");
      for (const TensorArg* t : {&q, &kv}) t->expect_contiguous();
      check_type(q, c.q_dtype);
      check_type(kv, c.kv_dtype);
    });
    StepStats st;
    run_kernel([&] {
      st = session_->decode(s_q, q.data<const void>(), kv.data<const void>(), out.data<float>(),
                            lse.data<float>(), root);
    });
    return step_stats(st);
  }

  std::vector<std::int64_t> prefill_positions(std::int64_t len) const {
    return session_->prefill_positions(len);
  }
  std::vector<std::int64_t> lengths() const {
    std::vector<std::int64_t> out;
    for (int s = 0; s < session_->config().b; ++s) out.push_back(session_->cache().length(s));
    return out;
  }

 private:
  static void check_type(const TensorArg& t, DType want) {
    RA_CHECK_ARG(storage_dtype(t.type, t.name) == want,
                 t.name << ": dtype " << elem_type_name(t.type) << " must be the session's "
                        << dtype_name(want));
  }

  std::shared_ptr<const Engine> engine_;
  std::vector<float> sinks_;
  std::unique_ptr<comm::Communicator> comm_;
  std::unique_ptr<MlaSession> session_;
};

// One-shot distributed MLA decode (mla_distributed_decode.hpp): this rank's paged shard
//   q [b, s_q, h_q, 576] fp32 | bf16 (identical on every rank)
//   k_cache [num_blocks, page_size, 1, 576] fp32 | bf16, block_table [b, max_blocks] int32,
//   cache_seqlens [b] int32: this rank's tokens [r L / P, (r + 1) L / P) of each sequence
//   global_seqlens [b]: L of each sequence
//   out [b, s_q, h_q, 512] fp32, lse [b, h_q, s_q] fp32: every rank (root < 0) or root.
void mla_decode_distributed(std::int64_t comm_handle, const TensorArg& q, const TensorArg& k_cache,
                            const std::optional<TensorArg>& out,
                            const std::optional<TensorArg>& lse, const TensorArg& block_table,
                            const TensorArg& cache_seqlens,
                            const std::vector<std::int32_t>& global_seqlens,
                            const std::optional<TensorArg>& sinks, float scale, bool causal,
                            int root) {
  auto eng = engine();
  run_kernel([&] {
    const comm::Communicator comm(MPI_Comm_f2c(static_cast<MPI_Fint>(comm_handle)));
    MlaDecodeParams p;
    comm::run_collectively(comm, [&] {
      q.expect_ndim(4, "[b, s_q, h_q, 576]");
      k_cache.expect_ndim(4, "[num_blocks, page_block_size, 1, 576]");
      for (const TensorArg* t : {&q, &k_cache, &block_table, &cache_seqlens})
        t->expect_contiguous();
      p.b = static_cast<int>(q.dim(0));
      p.s_q = static_cast<int>(q.dim(1));
      p.h_q = static_cast<int>(q.dim(2));
      p.head_dim = static_cast<int>(q.dim(3));
      p.q_dtype = storage_dtype(q.type, q.name);
      p.kv_dtype = storage_dtype(k_cache.type, k_cache.name);
      RA_CHECK_ARG(k_cache.dim(2) == 1,
                   k_cache.name << ": MLA has one latent KV head, got " << k_cache.dim(2));
      RA_CHECK_ARG(k_cache.dim(3) == p.head_dim, k_cache.name << ": head dim " << k_cache.dim(3)
                                                              << " must equal q's " << p.head_dim);
      p.num_blocks = static_cast<int>(k_cache.dim(0));
      p.page_size = static_cast<int>(k_cache.dim(1));
      RA_CHECK_ARG(block_table.type == ElemType::kI32 && cache_seqlens.type == ElemType::kI32,
                   "block_table, cache_seqlens: expected int32");
      block_table.expect_ndim(2, "[b, max_blocks]");
      block_table.expect_dim(0, p.b, "batch, q's dim 0");
      cache_seqlens.expect_ndim(1, "[b]");
      cache_seqlens.expect_dim(0, p.b, "batch, q's dim 0");
      RA_CHECK_ARG_EQ(static_cast<int>(global_seqlens.size()), p.b, "global cache_seqlens");
      p.max_blocks = static_cast<int>(block_table.dim(1));
      p.block_table = block_table.data<const std::int32_t>();
      p.cache_seqlens = cache_seqlens.data<const std::int32_t>();
      p.q = q.data<const void>();
      p.kv_cache = k_cache.data<const void>();
      p.out_dtype = DType::kF32;
      p.out = out ? out->data<void>() : nullptr;
      p.lse = lse ? lse->data<float>() : nullptr;
      p.sinks = sinks_data(sinks, p.h_q);
      p.scale = scale;
      p.causal = causal;
    });
    // out / lse are null on the ranks other than root (only root's are written).
    mla_distributed_decode(comm, *eng, p, global_seqlens.data(), root);
  });
}

}  // namespace

void register_session(py::module_& m) {
  py::class_<PyMlaSession>(m, "MlaSession")
      .def(py::init<std::int64_t, const std::string&, const std::string&, int, int, std::int64_t,
                    int, const std::string&, const std::string&, float,
                    const std::optional<TensorArg>&>(),
           py::arg("comm"), py::arg("q_dtype"), py::arg("kv_dtype"), py::arg("b"), py::arg("h_q"),
           py::arg("capacity"), py::arg("page_size"), py::arg("cache_layout"),
           py::arg("prompt_layout"), py::arg("scale"), py::arg("sinks") = py::none())
      .def("prefill", &PyMlaSession::prefill, py::arg("lens"), py::arg("kv"))
      .def("decode", &PyMlaSession::decode, py::arg("q"), py::arg("kv"), py::arg("out"),
           py::arg("lse"), py::arg("root"))
      .def("prefill_positions", &PyMlaSession::prefill_positions, py::arg("len"))
      .def("lengths", &PyMlaSession::lengths);
  m.def("mla_decode_distributed", &mla_decode_distributed, py::arg("comm"), py::arg("q"),
        py::arg("k_cache"), py::arg("out"), py::arg("lse"), py::arg("block_table"),
        py::arg("cache_seqlens"), py::arg("global_seqlens"), py::arg("sinks"), py::arg("scale"),
        py::arg("causal"), py::arg("root"));
  py::class_<PySession>(m, "KvSession")
      .def(py::init<std::int64_t, const std::string&, int, int, int, int, int, std::int64_t, int,
                    const std::string&, const std::string&, float, int, float,
                    const std::optional<TensorArg>&, int>(),
           py::arg("comm"), py::arg("dtype"), py::arg("b"), py::arg("h"), py::arg("h_k"),
           py::arg("d"), py::arg("d_v"), py::arg("capacity"), py::arg("page_size"),
           py::arg("cache_layout"), py::arg("prefill_layout"), py::arg("scale"),
           py::arg("window_left"), py::arg("softcap"), py::arg("sinks") = py::none(),
           py::arg("attention_chunk") = 0)
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
