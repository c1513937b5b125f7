// Bindings of the FlashAttention-3 forward family (docs/semantics.md sections 1-3):
// dense and varlen forward, the KV-cache forward and its scheduler plan. The Python
// side (ringattn/flash_attn_interface.py) checks argument kinds and allocates
// outputs; these functions fill the params struct from the tensors' own strides and
// run the engine with the GIL released. The engine validates shapes and values.
#include <optional>

#include "bind_common.hpp"

namespace ringattn::python {

namespace {

// Shapes that the four tensors must agree on; every mismatch names both tensors.
struct FwdShapes {
  int b = 0, s_q = 0, s_k = 0, h = 0, h_k = 0, d = 0, d_v = 0;
};

FwdShapes fwd_shapes(const TensorArg& q, const TensorArg& k, const TensorArg& v, bool varlen) {
  const int lead = varlen ? 1 : 2;  // [total, h, d] or [b, s, h, d]
  const char* shape_text = varlen ? "[total, h, d]" : "[b, s, h, d]";
  q.expect_ndim(lead + 2, shape_text);
  k.expect_ndim(lead + 2, shape_text);
  v.expect_ndim(lead + 2, shape_text);
  FwdShapes s;
  s.h = static_cast<int>(q.dim(-2));
  s.d = static_cast<int>(q.dim(-1));
  s.h_k = static_cast<int>(k.dim(-2));
  s.d_v = static_cast<int>(v.dim(-1));
  RA_CHECK_ARG(k.dim(-1) == s.d, "k: head dim " << k.dim(-1) << " must equal q's " << s.d);
  RA_CHECK_ARG(v.dim(-2) == s.h_k, "v: heads " << v.dim(-2) << " must equal k's " << s.h_k);
  RA_CHECK_ARG(v.dim(-3) == k.dim(-3),
               "v: length " << v.dim(-3) << " must equal k's " << k.dim(-3));
  if (!varlen) {
    s.b = static_cast<int>(q.dim(0));
    s.s_q = static_cast<int>(q.dim(1));
    s.s_k = static_cast<int>(k.dim(1));
    RA_CHECK_ARG(k.dim(0) == s.b, "k: batch " << k.dim(0) << " must equal q's " << s.b);
    RA_CHECK_ARG(v.dim(0) == s.b, "v: batch " << v.dim(0) << " must equal q's " << s.b);
  }
  return s;
}

// Row/head (and batch) strides of a [b, s, h, x] or [total, h, x] tensor.
void strides3(const TensorArg& t, bool varlen, std::int64_t& batch, std::int64_t& row,
              std::int64_t& head) {
  batch = varlen ? 0 : t.stride(0);
  row = t.stride(-3);
  head = t.stride(-2);
}

MaskParams mask_params(float scale, bool causal, int window_left, int window_right,
                       float softcap) {
  MaskParams m;
  m.scale = scale;
  m.causal = causal;
  m.window_left = window_left;
  m.window_right = window_right;
  m.softcap = softcap;
  return m;
}

// Dense: q [b, s_q, h, d], k [b, s_k, h_k, d], v [b, s_k, h_k, d_v] -> out
// [b, s_q, h, d_v], lse [b, h, s_q] (contiguous fp32). Varlen (cu_seqlens_q set):
// q [total_q, h, d], k/v [total_k, h_k, *], out [total_q, h, d_v], lse [h, total_q].
void fwd(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& out,
         const std::optional<TensorArg>& lse, const std::optional<TensorArg>& cu_seqlens_q,
         const std::optional<TensorArg>& cu_seqlens_k, const std::optional<TensorArg>& seqused_q,
         const std::optional<TensorArg>& seqused_k, int max_seqlen_q, int max_seqlen_k,
         float scale, bool causal, int window_left, int window_right, float softcap,
         int num_splits) {
  const bool varlen = cu_seqlens_q.has_value();
  RA_CHECK_ARG(varlen == cu_seqlens_k.has_value(),
               "cu_seqlens_q and cu_seqlens_k must be given together");
  const FwdShapes s = fwd_shapes(q, k, v, varlen);
  FwdParams p;
  p.dtype = storage_dtype(q.type, q.name);
  RA_CHECK_ARG(k.type == q.type && v.type == q.type,
               "k, v: dtype must equal q's " << elem_type_name(q.type) << ", got "
                                             << elem_type_name(k.type) << " and "
                                             << elem_type_name(v.type));
  p.out_dtype = storage_dtype(out.type, out.name);
  p.q = q.data<const void>();
  p.k = k.data<const void>();
  p.v = v.data<const void>();
  p.out = out.data<void>();
  strides3(q, varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides3(k, varlen, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides3(v, varlen, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides3(out, varlen, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  p.h = s.h;
  p.h_k = s.h_k;
  p.d = s.d;
  p.d_v = s.d_v;
  if (varlen) {
    p.b = static_cast<int>(cu_seqlens_q->dim(0)) - 1;
    p.s_q = max_seqlen_q;
    p.s_k = max_seqlen_k;
    p.cu_seqlens_q = cu_seqlens_q->data<const std::int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->data<const std::int32_t>();
    if (seqused_q) p.seqused_q = seqused_q->data<const std::int32_t>();
    if (seqused_k) p.seqused_k = seqused_k->data<const std::int32_t>();
  } else {
    p.b = s.b;
    p.s_q = s.s_q;
    p.s_k = s.s_k;
  }
  if (lse) {
    lse->expect_contiguous();
    p.lse = lse->data<float>();
  }
  p.mask = mask_params(scale, causal, window_left, window_right, softcap);
  p.num_splits = num_splits;
  auto eng = engine();
  py::gil_scoped_release release;
  eng->forward(p);
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("fwd", &fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("seqused_q"),
        py::arg("seqused_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("scale"), py::arg("causal"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), py::arg("num_splits"));
}

}  // namespace ringattn::python
