// Bindings of the MPI paths: ring attention (pass-KV and pass-Q, any shard layout,
// dense or varlen) and distributed decode, plus the shard-layout arithmetic the Python
// helpers use (ringattn.ring.shard / unshard), so that Python cuts tensors exactly as
// the C++ ring expects (docs/semantics.md section 5 for the merge; section 8
// for each layout's local token order).
//
// The communicator arrives as a Fortran handle (mpi4py's `comm.py2f()`) and is turned
// back into an MPI_Comm with MPI_Comm_f2c, so the extension needs no mpi4py headers.
// MPI itself is initialised by mpi4py; nothing here initialises or finalises it.
//
// Every function below is collective over the communicator. The Python layer agrees on
// argument errors across ranks before calling in; the checks here run inside
// comm::run_collectively as well, so a rank whose tensors disagree with the others
// (e.g. a shard of the wrong length) makes every rank throw instead of leaving the
// others waiting in the ring. The GIL is released for the whole collective.
// Python.h (through pybind11) comes before every other header: Python's configuration sets
// feature macros that the C and C++ standard headers read, and every translation unit of
// the module must see the same ones.
// clang-format off
#include <pybind11/pybind11.h>
// clang-format on

#include <mpi.h>
#include <pybind11/numpy.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "bind_common.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/distributed_decode.hpp"
#include "ringattn/ring_attention.hpp"
#include "ringattn/shard_layout.hpp"
#include "ringattn/ulysses_attention.hpp"

namespace ringattn::python {

namespace {

MPI_Comm comm_from_handle(std::int64_t handle) {
  return MPI_Comm_f2c(static_cast<MPI_Fint>(handle));
}

void expect_type(const TensorArg& t, ElemType want) {
  RA_CHECK_ARG(t.type == want, t.name << ": dtype " << elem_type_name(t.type) << " must be "
                                      << elem_type_name(want));
}

// Fills the ring params from this rank's tensors and checks them against the layout:
//   dense  (cu_seqlens absent): q [b, n_r, h, d], k [b, n_r, h_k, d], v [b, n_r, h_k, d_v],
//          out [b, n_r, h, d_v] fp32, lse [b, h, n_r] fp32, with n_r = shard_length(s).
//   varlen (cu_seqlens [b + 1] global offsets): q [t_r, h, d], k/v [t_r, h_k, *],
//          out [t_r, h, d_v] fp32, lse [h, t_r] fp32.
// All tensors contiguous (the Python layer makes contiguous copies when needed).
RingAttentionParams ring_params(const TensorArg& q, const TensorArg& k, const TensorArg& v,
                                const TensorArg& out, const std::optional<TensorArg>& lse,
                                const std::optional<TensorArg>& cu_seqlens, std::int64_t s,
                                ShardLayout layout, const MaskParams& mask, int ranks, int rank,
                                int ulysses) {
  const bool varlen = cu_seqlens.has_value();
  const int lead = varlen ? 1 : 2;
  const char* shape_text = varlen ? "[t_local, h, d]" : "[b, s_local, h, d]";
  for (const TensorArg* t : {&q, &k, &v, &out}) {
    t->expect_ndim(lead + 2, shape_text);
    t->expect_contiguous();
  }
  RingAttentionParams p;
  p.dtype = storage_dtype(q.type, q.name);
  RA_CHECK_ARG(k.type == q.type && v.type == q.type, "k, v: dtype must equal q's "
                                                         << elem_type_name(q.type) << ", got "
                                                         << elem_type_name(k.type) << " and "
                                                         << elem_type_name(v.type));
  expect_type(out, ElemType::kF32);
  p.h = static_cast<int>(q.dim(-2));
  p.d = static_cast<int>(q.dim(-1));
  p.h_k = static_cast<int>(k.dim(-2));
  p.d_v = static_cast<int>(v.dim(-1));
  RA_CHECK_ARG(k.dim(-1) == p.d, "k: head dim " << k.dim(-1) << " must equal q's " << p.d);
  RA_CHECK_ARG(v.dim(-2) == p.h_k, "v: heads " << v.dim(-2) << " must equal k's " << p.h_k);
  check_ulysses_grid(ranks, ulysses, p.h, p.h_k);
  // Tokens of a `len`-token sequence on this rank (ring layout, or the Ulysses x ring one).
  const auto local_len = [&](std::int64_t len) {
    return ulysses > 1 ? hybrid_shard_length(layout, len, ranks, ulysses, rank)
                       : shard_length(layout, len, ranks, rank);
  };
  std::int64_t rows = 0;  // tokens this rank must hold per sequence (dense) or in all
  if (varlen) {
    expect_type(*cu_seqlens, ElemType::kI32);
    cu_seqlens->expect_ndim(1, "[b + 1]");
    cu_seqlens->expect_contiguous();
    RA_CHECK_ARG_GE(cu_seqlens->dim(0), 2, "cu_seqlens: length (b + 1)");
    p.b = static_cast<int>(cu_seqlens->dim(0) - 1);
    p.cu_seqlens = cu_seqlens->data<const std::int32_t>();
    p.s = 0;
    for (int i = 0; i < p.b; ++i) rows += local_len(p.cu_seqlens[i + 1] - p.cu_seqlens[i]);
  } else {
    p.b = static_cast<int>(q.dim(0));
    RA_CHECK_ARG(s >= 1 && s <= INT32_MAX, "seqlen: global length " << s << " out of range");
    p.s = static_cast<int>(s);
    rows = local_len(s);
  }
  const std::int64_t len_dim = varlen ? 0 : 1;
  RA_CHECK_ARG(q.dim(static_cast<int>(len_dim)) == rows,
               "q: local length " << q.dim(static_cast<int>(len_dim)) << " must be " << rows << " ("
                                  << layout_name(layout) << " shard of rank " << rank << " of "
                                  << ranks << ")");
  for (const TensorArg* t : {&k, &v, &out}) {
    for (int i = 0; i <= static_cast<int>(len_dim); ++i)
      RA_CHECK_ARG(t->dim(i) == q.dim(i),
                   t->name << ": dim " << i << " is " << t->dim(i) << ", q's is " << q.dim(i));
  }
  RA_CHECK_ARG(out.dim(-2) == p.h && out.dim(-1) == p.d_v,
               "out: heads/head dim (" << out.dim(-2) << ", " << out.dim(-1) << ") must be (" << p.h
                                       << ", " << p.d_v << ")");
  if (lse) {
    expect_type(*lse, ElemType::kF32);
    lse->expect_contiguous();
    if (varlen) {
      lse->expect_ndim(2, "[h, t_local]");
      lse->expect_dim(0, p.h, "h");
      lse->expect_dim(1, rows, "t_local");
    } else {
      lse->expect_ndim(3, "[b, h, s_local]");
      lse->expect_dim(0, p.b, "b");
      lse->expect_dim(1, p.h, "h");
      lse->expect_dim(2, rows, "s_local");
    }
    p.lse = lse->data<float>();
  }
  p.q = q.data<const void>();
  p.k = k.data<const void>();
  p.v = v.data<const void>();
  p.out = out.data<float>();
  p.mask = mask;
  p.layout = layout;
  return p;
}

// Ring attention over the communicator with Fortran handle `comm_handle`; `mode` is
// "pass-kv" or "pass-q", `layout` "contiguous" | "zigzag" | "striped"; `s` is the
// global length (dense; ignored for varlen, whose cu_seqlens are global offsets).
void ring_forward(std::int64_t comm_handle, const TensorArg& q, const TensorArg& k,
                  const TensorArg& v, const TensorArg& out, const std::optional<TensorArg>& lse,
                  const std::optional<TensorArg>& cu_seqlens, std::int64_t s,
                  const std::string& layout, const std::string& mode, float scale, bool causal,
                  int window_left, int window_right, float softcap, int piece_rows, int ulysses,
                  const std::optional<TensorArg>& sinks, int attention_chunk) {
  auto eng = engine();
  MaskParams mask = mask_params(scale, causal, window_left, window_right, softcap);
  mask.attention_chunk = attention_chunk;  // checked by the ring (>= 0)
  run_kernel([&] {
    comm::Communicator comm(comm_from_handle(comm_handle));
    RingAttentionParams p;
    RingMode ring_mode = RingMode::kPassKV;
    RingOptions options;
    comm::run_collectively(comm, [&] {
      ring_mode = parse_ring_mode(mode);
      RA_CHECK_ARG_GE(piece_rows, 0, "piece_rows");
      options.piece_rows = piece_rows;
      p = ring_params(q, k, v, out, lse, cu_seqlens, s, parse_layout(layout), mask, comm.size(),
                      comm.rank(), ulysses);
      p.mask.sinks = sinks_data(sinks, p.h);  // applied once, after the ring's last merge
    });
    hybrid_attention_forward(comm, *eng, p, ulysses, ring_mode, options);
  });
}

// Distributed decode: q [b, s_q, h, d] (same on every rank), k_cache [b, n_r, h_k, d],
// v_cache [b, n_r, h_k, d_v] (this rank's contiguous cache shard of a global length
// s_cache), out [b, s_q, h, d_v] fp32 and lse [b, h, s_q] fp32 (absent on ranks other
// than `root` when root >= 0).
void decode_forward(std::int64_t comm_handle, const TensorArg& q, const TensorArg& k_cache,
                    const TensorArg& v_cache, const std::optional<TensorArg>& out,
                    const std::optional<TensorArg>& lse, std::int64_t s_cache, float scale,
                    bool causal, int window_left, int window_right, float softcap, int root,
                    const std::optional<TensorArg>& sinks, int attention_chunk) {
  auto eng = engine();
  run_kernel([&] {
    comm::Communicator comm(comm_from_handle(comm_handle));
    DecodeParams p;
    comm::run_collectively(comm, [&] {
      for (const TensorArg* t : {&q, &k_cache, &v_cache}) {
        t->expect_ndim(4, "[b, s, h, d]");
        t->expect_contiguous();
      }
      p.dtype = storage_dtype(q.type, q.name);
      RA_CHECK_ARG(k_cache.type == q.type && v_cache.type == q.type,
                   "k_cache, v_cache: dtype must equal q's "
                       << elem_type_name(q.type) << ", got " << elem_type_name(k_cache.type)
                       << " and " << elem_type_name(v_cache.type));
      p.b = static_cast<int>(q.dim(0));
      p.s_q = static_cast<int>(q.dim(1));
      p.h = static_cast<int>(q.dim(2));
      p.d = static_cast<int>(q.dim(3));
      p.h_k = static_cast<int>(k_cache.dim(2));
      p.d_v = static_cast<int>(v_cache.dim(3));
      p.s_cache = s_cache;
      p.root = root;
      RA_CHECK_ARG(s_cache >= comm.size(), "decode: cache length "
                                               << s_cache << " is smaller than the "
                                               << "number of ranks " << comm.size());
      const std::int64_t n_r = decode_shard_length(s_cache, comm.size(), comm.rank());
      k_cache.expect_dim(0, p.b, "b");
      k_cache.expect_dim(1, n_r, "local cache length");
      k_cache.expect_dim(3, p.d, "d");
      v_cache.expect_dim(0, p.b, "b");
      v_cache.expect_dim(1, n_r, "local cache length");
      v_cache.expect_dim(2, p.h_k, "h_k");
      const bool writes = root < 0 || root == comm.rank();
      RA_CHECK_ARG(!writes || out.has_value(), "out: required on this rank");
      if (out) {
        expect_type(*out, ElemType::kF32);
        out->expect_ndim(4, "[b, s_q, h, d_v]");
        out->expect_contiguous();
        const std::int64_t want[4] = {p.b, p.s_q, p.h, p.d_v};
        for (int i = 0; i < 4; ++i) out->expect_dim(i, want[i], "[b, s_q, h, d_v]");
        p.out = out->data<float>();
      }
      if (lse) {
        expect_type(*lse, ElemType::kF32);
        lse->expect_ndim(3, "[b, h, s_q]");
        lse->expect_contiguous();
        const std::int64_t want[3] = {p.b, p.h, p.s_q};
        for (int i = 0; i < 3; ++i) lse->expect_dim(i, want[i], "[b, h, s_q]");
        p.lse = lse->data<float>();
      }
      p.q = q.data<const void>();
      p.k_cache = k_cache.data<const void>();
      p.v_cache = v_cache.data<const void>();
      p.mask = mask_params(scale, causal, window_left, window_right, softcap);
      p.mask.attention_chunk = attention_chunk;  // checked by the decode (>= 0)
      p.mask.sinks = sinks_data(sinks, p.h);     // applied once, after the reduction
    });
    distributed_decode(comm, *eng, p);
  });
}

// Token positions rank `rank` of `ranks` holds in a `len`-token sequence, in local order.
// With ulysses > 1: the Ulysses x ring layout (ulysses_attention.hpp).
py::array_t<std::int64_t> shard_positions_binding(const std::string& layout, std::int64_t len,
                                                  int ranks, int rank, int ulysses) {
  RA_CHECK_ARG(ranks >= 1 && rank >= 0 && rank < ranks,
               "rank " << rank << " must lie in [0, size) with size = " << ranks);
  RA_CHECK_ARG_GE(len, 0, "sequence length");
  RA_CHECK_ARG(ulysses >= 1 && ranks % ulysses == 0,
               "ulysses_degree: " << ulysses << " must be >= 1 and divide the size " << ranks);
  const std::vector<std::int64_t> pos =
      ulysses > 1 ? hybrid_shard_positions(parse_layout(layout), len, ranks, ulysses, rank)
                  : shard_positions(parse_layout(layout), len, ranks, rank);
  py::array_t<std::int64_t> a(static_cast<py::ssize_t>(pos.size()));
  std::copy(pos.begin(), pos.end(), a.mutable_data());
  return a;
}

std::int64_t shard_length_binding(const std::string& layout, std::int64_t len, int ranks, int rank,
                                  int ulysses) {
  RA_CHECK_ARG(ranks >= 1 && rank >= 0 && rank < ranks,
               "rank " << rank << " must lie in [0, size) with size = " << ranks);
  RA_CHECK_ARG_GE(len, 0, "sequence length");
  RA_CHECK_ARG(ulysses >= 1 && ranks % ulysses == 0,
               "ulysses_degree: " << ulysses << " must be >= 1 and divide the size " << ranks);
  if (ulysses > 1) return hybrid_shard_length(parse_layout(layout), len, ranks, ulysses, rank);
  return shard_length(parse_layout(layout), len, ranks, rank);
}

}  // namespace

void register_ring(py::module_& m) {
  m.def("ring_forward", &ring_forward, py::arg("comm"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("cu_seqlens"), py::arg("s"), py::arg("layout"),
        py::arg("mode"), py::arg("scale"), py::arg("causal"), py::arg("window_left"),
        py::arg("window_right"), py::arg("softcap"), py::arg("piece_rows"), py::arg("ulysses") = 1,
        py::arg("sinks") = py::none(), py::arg("attention_chunk") = 0);
  m.def("distributed_decode", &decode_forward, py::arg("comm"), py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("out"), py::arg("lse"), py::arg("s_cache"), py::arg("scale"),
        py::arg("causal"), py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
        py::arg("root"), py::arg("sinks") = py::none(), py::arg("attention_chunk") = 0);
  m.def("shard_positions", &shard_positions_binding, py::arg("layout"), py::arg("len"),
        py::arg("ranks"), py::arg("rank"), py::arg("ulysses") = 1);
  m.def("shard_length", &shard_length_binding, py::arg("layout"), py::arg("len"), py::arg("ranks"),
        py::arg("rank"), py::arg("ulysses") = 1);
  m.def("check_ulysses_grid", &check_ulysses_grid, py::arg("ranks"), py::arg("ulysses"),
        py::arg("h"), py::arg("h_k"));
  m.def("decode_shard_length", &decode_shard_length, py::arg("s_cache"), py::arg("ranks"),
        py::arg("rank"));
}

}  // namespace ringattn::python
