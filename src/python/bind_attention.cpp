// Bindings of the FlashAttention-3 forward family (docs/semantics.md sections 1-3
// and 5): dense and varlen forward, the KV-cache forward and its scheduler plan, and
// the split combine. The Python side (ringattn/flash_attn_interface.py) checks
// argument kinds and allocates outputs; these functions check that the tensors agree
// on shapes (naming both), fill the params struct from the tensors' own strides and
// run the engine with the GIL released. The engine validates the rest.
// Python.h (through pybind11) comes before every other header: Python's configuration sets
// feature macros that the C and C++ standard headers read, and every translation unit of
// the module must see the same ones.
// clang-format off
#include <pybind11/pybind11.h>
// clang-format on

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "bind_common.hpp"
#include "ringattn/merge_state.hpp"

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
  RA_CHECK_ARG(s.h_k >= 1 && s.h % s.h_k == 0,
               "k: heads h_k=" << s.h_k << " must divide q's heads h=" << s.h);
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

// Storage dtype of an attention operand: fp32 / bf16 / fp16, or fp8 e4m3 given as
// torch.float8_e4m3fn or as uint8 holding the e4m3 bits (torch builds without fp8).
DType attn_dtype(const TensorArg& t) {
  return t.type == ElemType::kU8 ? DType::kFP8E4M3 : storage_dtype(t.type, t.name);
}

// fp8 descale [b, h_k] fp32 (FA3 q_descale / k_descale / v_descale), last dim contiguous,
// any batch stride (0: broadcast): its data and batch stride, or nullptr when absent.
const float* descale_data(const std::optional<TensorArg>& t, int b, int h_k,
                          std::int64_t& batch_stride) {
  if (!t) return nullptr;
  RA_CHECK_ARG(t->type == ElemType::kF32,
               t->name << ": expected fp32, got " << elem_type_name(t->type));
  t->expect_ndim(2, "[b, h_k]");
  t->expect_dim(0, b, "batch");
  t->expect_dim(1, h_k, "KV heads");
  RA_CHECK_ARG(t->stride(1) == 1 || h_k == 1,
               t->name << ": last dim must be contiguous, got stride " << t->stride(1));
  batch_stride = t->stride(0);
  return t->data<const float>();
}

void set_descales(Fp8Descale& ds, int b, int h_k, const std::optional<TensorArg>& q_descale,
                  const std::optional<TensorArg>& k_descale,
                  const std::optional<TensorArg>& v_descale) {
  ds.q = descale_data(q_descale, b, h_k, ds.q_batch_stride);
  ds.k = descale_data(k_descale, b, h_k, ds.k_batch_stride);
  ds.v = descale_data(v_descale, b, h_k, ds.v_batch_stride);
}

// "[2, 3, 6, 64]"
std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

// FA3's qv (extra query part, score = scale * (q . k + qv . v)): shaped as out
// ([b, s_q, h, d_v], or [total_q, h, d_v] when varlen), in q's dtype. Sets the params'
// qv pointer and strides; a mismatch names both shapes.
template <class Params>
void set_qv(const std::optional<TensorArg>& qv, const TensorArg& q, bool varlen, std::int64_t b,
            std::int64_t s_q, std::int64_t h, std::int64_t d_v, Params& p) {
  if (!qv) return;
  const std::vector<std::int64_t> want = varlen ? std::vector<std::int64_t>{q.dim(0), h, d_v}
                                                : std::vector<std::int64_t>{b, s_q, h, d_v};
  const char* want_text = varlen ? "[total_q, h, d_v]" : "[b, s_q, h, d_v]";
  RA_CHECK_ARG(qv->type == q.type, qv->name << ": dtype " << elem_type_name(qv->type)
                                            << " must equal q's " << elem_type_name(q.type));
  RA_CHECK_ARG(qv->shape == want, qv->name << ": shape " << shape_text(qv->shape) << " must equal "
                                           << want_text << " = " << shape_text(want) << " (q is "
                                           << shape_text(q.shape) << ")");
  p.qv = qv->data<const void>();
  strides3(*qv, varlen, p.qv_batch_stride, p.qv_row_stride, p.qv_head_stride);
}

// Dense: q [b, s_q, h, d], k [b, s_k, h_k, d], v [b, s_k, h_k, d_v] -> out
// [b, s_q, h, d_v], lse [b, h, s_q] (contiguous fp32). Varlen (cu_seqlens_q set):
// q [total_q, h, d], k/v [total_k, h_k, *], out [total_q, h, d_v], lse [h, total_q].
// qv (optional): shaped as out, q's dtype.
void fwd(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& out,
         const std::optional<TensorArg>& lse, const std::optional<TensorArg>& cu_seqlens_q,
         const std::optional<TensorArg>& cu_seqlens_k, const std::optional<TensorArg>& seqused_q,
         const std::optional<TensorArg>& seqused_k, int max_seqlen_q, int max_seqlen_k, float scale,
         bool causal, int window_left, int window_right, float softcap, int num_splits,
         const std::optional<TensorArg>& sinks, int attention_chunk,
         const std::optional<TensorArg>& q_descale, const std::optional<TensorArg>& k_descale,
         const std::optional<TensorArg>& v_descale, const std::optional<TensorArg>& qv) {
  const bool varlen = cu_seqlens_q.has_value();
  RA_CHECK_ARG(varlen == cu_seqlens_k.has_value(),
               "cu_seqlens_q and cu_seqlens_k must be given together");
  const FwdShapes s = fwd_shapes(q, k, v, varlen);
  FwdParams p;
  p.dtype = attn_dtype(q);
  RA_CHECK_ARG(k.type == q.type && v.type == q.type, "k, v: dtype must equal q's "
                                                         << elem_type_name(q.type) << ", got "
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
  p.mask.sinks = sinks_data(sinks, p.h);
  p.mask.attention_chunk = attention_chunk;
  p.num_splits = num_splits;
  set_descales(p.descale, p.b, p.h_k, q_descale, k_descale, v_descale);
  set_qv(qv, q, varlen, s.b, s.s_q, s.h, s.d_v, p);
  auto eng = engine();
  run_kernel([&] { eng->forward(p); });
}

// Index vector of `n` int32 entries ([n], contiguous): its data, or null when absent.
const std::int32_t* index_data(const std::optional<TensorArg>& t, std::int64_t n,
                               const char* what) {
  if (!t) return nullptr;
  RA_CHECK_ARG(t->type == ElemType::kI32,
               t->name << ": expected int32, got " << elem_type_name(t->type));
  t->expect_ndim(1, what);
  t->expect_dim(0, n, "batch");
  t->expect_contiguous();
  return t->data<const std::int32_t>();
}

// KV-cache forward (docs/semantics.md section 3):
//   q [b, s_q, h, d]; k_cache [b_cache, s_cache, h_k, d] or paged [num_blocks, page_size,
//   h_k, d] with page_table [b, max_pages]; v_cache likewise with d_v; k_new/v_new
//   [b, s_new, h_k, d / d_v] appended in place; out [b, s_q, h, d_v]; lse [b, h, s_q].
//   cache_seqlens/cache_batch_idx/cache_leftpad [b] int32; rotary_cos/sin
//   [s_rotary, rotary_dim / 2] fp32 contiguous; plan [b] int32 key splits per sequence.
//   qv (optional): shaped as out, q's dtype, not rotated.
void fwd_kvcache(const TensorArg& q, const TensorArg& k_cache, const TensorArg& v_cache,
                 const std::optional<TensorArg>& k_new, const std::optional<TensorArg>& v_new,
                 const TensorArg& out, const std::optional<TensorArg>& lse,
                 const TensorArg& cache_seqlens, const std::optional<TensorArg>& cache_batch_idx,
                 const std::optional<TensorArg>& cache_leftpad,
                 const std::optional<TensorArg>& page_table,
                 const std::optional<TensorArg>& rotary_cos,
                 const std::optional<TensorArg>& rotary_sin, bool rotary_interleaved, float scale,
                 bool causal, int window_left, int window_right, float softcap, int num_splits,
                 const std::optional<TensorArg>& plan, const std::optional<TensorArg>& sinks,
                 int attention_chunk, const std::optional<TensorArg>& rotary_seqlens,
                 const std::optional<TensorArg>& cu_seqlens_q, int max_seqlen_q,
                 const std::optional<TensorArg>& cu_seqlens_k_new,
                 const std::optional<TensorArg>& q_descale,
                 const std::optional<TensorArg>& k_descale,
                 const std::optional<TensorArg>& v_descale, const std::optional<TensorArg>& qv) {
  // Packed forms (FA3 chunked prefill): cu_seqlens_q [b + 1] makes q [total_q, h, d], out
  // [total_q, h, d_v], lse [h, total_q]; cu_seqlens_k_new [b + 1] makes k / v
  // [total_new, h_k, d / d_v]. Offsets are checked by the engine (naming the entry).
  const bool vq = cu_seqlens_q.has_value(), vk = cu_seqlens_k_new.has_value();
  // Longest segment of a [b + 1] offsets vector.
  const auto longest = [](const TensorArg& cu) {
    const auto* c = cu.data<const std::int32_t>();
    std::int64_t m = 0;
    for (std::int64_t i = 0; i + 1 < cu.dim(0); ++i) m = std::max<std::int64_t>(m, c[i + 1] - c[i]);
    return m;
  };
  for (const auto* cu : {&cu_seqlens_q, &cu_seqlens_k_new}) {
    if (!*cu) continue;
    RA_CHECK_ARG((*cu)->type == ElemType::kI32,
                 (*cu)->name << ": expected int32, got " << elem_type_name((*cu)->type));
    (*cu)->expect_ndim(1, "[b + 1]");
    (*cu)->expect_contiguous();
    RA_CHECK_ARG((*cu)->dim(0) >= 2,
                 (*cu)->name << ": needs b + 1 >= 2 entries, got " << (*cu)->dim(0));
  }
  q.expect_ndim(vq ? 3 : 4, vq ? "[total_q, h, d]" : "[b, s_q, h, d]");
  k_cache.expect_ndim(4, "[b_cache, s_cache, h_k, d] or [num_blocks, page_size, h_k, d]");
  v_cache.expect_ndim(4, "[b_cache, s_cache, h_k, d_v] or [num_blocks, page_size, h_k, d_v]");
  KvCacheParams p;
  p.b = static_cast<int>(vq ? cu_seqlens_q->dim(0) - 1 : q.dim(0));
  p.s_q = static_cast<int>(vq ? std::max<std::int64_t>(max_seqlen_q, longest(*cu_seqlens_q))
                              : q.dim(1));
  p.h = static_cast<int>(q.dim(-2));
  p.d = static_cast<int>(q.dim(-1));
  if (vq) p.cu_seqlens_q = cu_seqlens_q->data<const std::int32_t>();
  p.h_k = static_cast<int>(k_cache.dim(2));
  p.d_v = static_cast<int>(v_cache.dim(3));
  RA_CHECK_ARG(k_cache.dim(3) == p.d,
               "k_cache: head dim " << k_cache.dim(3) << " must equal q's " << p.d);
  RA_CHECK_ARG(p.h_k >= 1 && p.h % p.h_k == 0,
               "k_cache: heads h_k=" << p.h_k << " must divide q's heads h=" << p.h);
  for (int i = 0; i < 3; ++i) {
    RA_CHECK_ARG(v_cache.dim(i) == k_cache.dim(i), "v_cache: shape dim "
                                                       << i << " is " << v_cache.dim(i)
                                                       << ", k_cache's is " << k_cache.dim(i));
  }
  p.dtype = attn_dtype(q);
  p.out_dtype = storage_dtype(out.type, out.name);
  for (const TensorArg* t : {&k_cache, &v_cache}) {
    RA_CHECK_ARG(t->type == q.type, t->name << ": dtype " << elem_type_name(t->type)
                                            << " must equal q's " << elem_type_name(q.type));
  }
  p.q = q.data<const void>();
  p.k_cache = k_cache.data<void>();
  p.v_cache = v_cache.data<void>();
  p.out = out.data<void>();
  out.expect_ndim(q.ndim(), vq ? "[total_q, h, d_v]" : "[b, s_q, h, d_v]");
  strides3(q, vq, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides3(k_cache, false, p.k_cache_batch_stride, p.k_cache_row_stride, p.k_cache_head_stride);
  strides3(v_cache, false, p.v_cache_batch_stride, p.v_cache_row_stride, p.v_cache_head_stride);
  strides3(out, vq, p.out_batch_stride, p.out_row_stride, p.out_head_stride);

  RA_CHECK_ARG(k_new.has_value() == v_new.has_value(),
               "k, v: new keys and values must be given together (k "
                   << (k_new ? "set" : "None") << ", v " << (v_new ? "set" : "None") << ")");
  RA_CHECK_ARG(!vk || k_new, "cu_seqlens_k_new: needs new keys and values k, v");
  if (k_new) {
    const int lead = vk ? 1 : 2;
    k_new->expect_ndim(lead + 2, vk ? "[total_new, h_k, d]" : "[b, s_new, h_k, d]");
    v_new->expect_ndim(lead + 2, vk ? "[total_new, h_k, d_v]" : "[b, s_new, h_k, d_v]");
    std::vector<std::int64_t> want_k{p.b, k_new->dim(1), p.h_k, p.d};
    std::vector<std::int64_t> want_v{p.b, k_new->dim(1), p.h_k, p.d_v};
    if (vk) {
      want_k = {k_new->dim(0), p.h_k, p.d};
      want_v = {k_new->dim(0), p.h_k, p.d_v};
    }
    for (int i = 0; i < lead + 2; ++i) {
      RA_CHECK_ARG(k_new->dim(i) == want_k[static_cast<std::size_t>(i)],
                   k_new->name << ": shape dim " << i << " is " << k_new->dim(i) << ", expected "
                               << want_k[static_cast<std::size_t>(i)]);
      RA_CHECK_ARG(v_new->dim(i) == want_v[static_cast<std::size_t>(i)],
                   v_new->name << ": shape dim " << i << " is " << v_new->dim(i) << ", expected "
                               << want_v[static_cast<std::size_t>(i)]);
    }
    for (const TensorArg* t : {&*k_new, &*v_new}) {
      RA_CHECK_ARG(t->type == q.type, t->name << ": dtype " << elem_type_name(t->type)
                                              << " must equal q's " << elem_type_name(q.type));
    }
    p.s_new = static_cast<int>(vk ? longest(*cu_seqlens_k_new) : k_new->dim(1));
    if (vk) {
      RA_CHECK_ARG_EQ(cu_seqlens_k_new->dim(0) - 1, std::int64_t{p.b},
                      "cu_seqlens_k_new: sequences (entries - 1) vs the batch");
      p.cu_seqlens_k_new = cu_seqlens_k_new->data<const std::int32_t>();
    }
    p.k_new = k_new->data<const void>();
    p.v_new = v_new->data<const void>();
    strides3(*k_new, vk, p.k_new_batch_stride, p.k_new_row_stride, p.k_new_head_stride);
    strides3(*v_new, vk, p.v_new_batch_stride, p.v_new_row_stride, p.v_new_head_stride);
  }
  if (lse) {
    lse->expect_ndim(vq ? 2 : 3, vq ? "[h, total_q]" : "[b, h, s_q]");
    lse->expect_contiguous();
    p.lse = lse->data<float>();
  }

  p.cache_seqlens = index_data(cache_seqlens, p.b, "[b]");
  p.cache_batch_idx = index_data(cache_batch_idx, p.b, "[b]");
  p.cache_leftpad = index_data(cache_leftpad, p.b, "[b]");
  if (page_table) {
    RA_CHECK_ARG(page_table->type == ElemType::kI32,
                 page_table->name << ": expected int32, got " << elem_type_name(page_table->type));
    page_table->expect_ndim(2, "[b, max_pages]");
    page_table->expect_dim(0, p.b, "batch");
    RA_CHECK_ARG(
        page_table->stride(1) == 1 || page_table->dim(1) <= 1,
        page_table->name << ": last dim must be contiguous, got stride " << page_table->stride(1));
    p.page_table = page_table->data<const std::int32_t>();
    p.page_table_batch_stride = page_table->stride(0);
    p.max_pages = static_cast<int>(page_table->dim(1));
    p.num_blocks = static_cast<int>(k_cache.dim(0));
    p.page_size = static_cast<int>(k_cache.dim(1));
  } else {
    p.b_cache = static_cast<int>(k_cache.dim(0));
    p.s_cache = static_cast<int>(k_cache.dim(1));
  }

  RA_CHECK_ARG(rotary_cos.has_value() == rotary_sin.has_value(),
               "rotary_cos, rotary_sin: must be given together");
  if (rotary_cos) {
    for (const TensorArg* t : {&*rotary_cos, &*rotary_sin}) {
      RA_CHECK_ARG(t->type == ElemType::kF32,
                   t->name << ": expected fp32, got " << elem_type_name(t->type));
      t->expect_ndim(2, "[s_rotary, rotary_dim / 2]");
      t->expect_contiguous();
    }
    RA_CHECK_ARG(rotary_sin->shape == rotary_cos->shape,
                 "rotary_sin: shape [" << rotary_sin->dim(0) << ", " << rotary_sin->dim(1)
                                       << "] must equal rotary_cos's [" << rotary_cos->dim(0)
                                       << ", " << rotary_cos->dim(1) << "]");
    p.rotary_cos = rotary_cos->data<const float>();
    p.rotary_sin = rotary_sin->data<const float>();
    p.s_rotary = static_cast<int>(rotary_cos->dim(0));
    p.rotary_dim = static_cast<int>(2 * rotary_cos->dim(1));
    p.rotary_interleaved = rotary_interleaved;
  }

  p.mask = mask_params(scale, causal, window_left, window_right, softcap);
  p.rotary_seqlens = index_data(rotary_seqlens, p.b, "[b]");
  p.mask.sinks = sinks_data(sinks, p.h);
  p.mask.attention_chunk = attention_chunk;
  p.num_splits = num_splits;
  set_descales(p.descale, p.b, p.h_k, q_descale, k_descale, v_descale);
  set_qv(qv, q, vq, p.b, p.s_q, p.h, p.d_v, p);
  SchedulerMetadata md;
  auto eng = engine();
  if (plan) {
    const std::int32_t* splits = index_data(plan, p.b, "[b]");
    md.b = p.b;
    md.threads = eng->threads();
    md.num_splits.assign(splits, splits + p.b);
    p.plan = &md;
  }
  run_kernel([&] { eng->forward_kvcache(p); });
}

// Scheduler plan of a KV-cache call with these shapes (FA3 get_scheduler_metadata):
// key splits per sequence, [b]. The plan reads only shapes and lengths; the params'
// data pointers must be non-null to pass validation, so they point at a dummy byte
// that is never dereferenced.
std::vector<std::int32_t> plan_kvcache(int b, int s_q, int s_cache, int h, int h_k, int d, int d_v,
                                       const std::string& dtype, const TensorArg& cache_seqlens,
                                       const std::optional<TensorArg>& cache_leftpad, int s_new,
                                       bool causal, int window_left, int window_right,
                                       float softcap, int num_splits) {
  static char dummy = 0;
  KvCacheParams p;
  p.dtype = parse_dtype(dtype, "qkv_dtype");
  p.out_dtype = p.dtype;
  p.b = b;
  p.s_q = s_q;
  p.h = h;
  p.h_k = h_k;
  p.d = d;
  p.d_v = d_v;
  p.s_new = s_new;
  p.b_cache = b;
  p.s_cache = s_cache;
  // Contiguous strides, as the validation checks them like a real call's.
  const auto contiguous = [](std::int64_t rows, std::int64_t heads, std::int64_t dim,
                             std::int64_t& batch_stride, std::int64_t& row_stride,
                             std::int64_t& head_stride) {
    head_stride = dim;
    row_stride = heads * dim;
    batch_stride = rows * heads * dim;
  };
  contiguous(s_q, h, d, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  contiguous(s_q, h, d_v, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  contiguous(s_cache, h_k, d, p.k_cache_batch_stride, p.k_cache_row_stride, p.k_cache_head_stride);
  contiguous(s_cache, h_k, d_v, p.v_cache_batch_stride, p.v_cache_row_stride,
             p.v_cache_head_stride);
  contiguous(s_new, h_k, d, p.k_new_batch_stride, p.k_new_row_stride, p.k_new_head_stride);
  contiguous(s_new, h_k, d_v, p.v_new_batch_stride, p.v_new_row_stride, p.v_new_head_stride);
  p.q = &dummy;
  p.out = &dummy;
  p.k_cache = &dummy;
  p.v_cache = &dummy;
  if (s_new > 0) {
    p.k_new = &dummy;
    p.v_new = &dummy;
  }
  RA_CHECK_ARG_GE(b, 1, "batch_size: must be >= 1");
  p.cache_seqlens = index_data(cache_seqlens, b, "[b]");
  p.cache_leftpad = index_data(cache_leftpad, b, "[b]");
  p.mask = mask_params(0.0f, causal, window_left, window_right, softcap);
  p.num_splits = num_splits;
  auto eng = engine();
  SchedulerMetadata md;
  {
    py::gil_scoped_release release;
    md = eng->plan_kvcache(p);
  }
  return md.num_splits;
}

// Split combine (FA3 flash_attn_combine, docs/semantics.md section 5):
//   out_partial [num_splits, b, s, h, d] fp32, lse_partial [num_splits, b, s, h] fp32
//   (any strides, last dim of out_partial contiguous) -> out [b, s, h, d] (fp32, bf16
//   or fp16, any strides with a contiguous last dim), lse [b, s, h] fp32 (any strides).
// Each output row gathers its num_splits partial rows into a small per-thread buffer
// and merges them with merge_states; the partials are never copied as a whole. Splits
// whose LSE is -inf (or +inf) are empty; a row whose splits are all empty gives 0 / -inf.
void combine(const TensorArg& out_partial, const TensorArg& lse_partial, const TensorArg& out,
             const TensorArg& lse) {
  out_partial.expect_ndim(5, "[num_splits, b, s, h, d]");
  lse_partial.expect_ndim(4, "[num_splits, b, s, h]");
  out.expect_ndim(4, "[b, s, h, d]");
  lse.expect_ndim(3, "[b, s, h]");
  for (const TensorArg* t : {&out_partial, &lse_partial, &lse}) {
    RA_CHECK_ARG(t->type == ElemType::kF32,
                 t->name << ": expected fp32, got " << elem_type_name(t->type));
  }
  const DType out_dtype = storage_dtype(out.type, out.name);
  for (int i = 0; i < 4; ++i) {
    RA_CHECK_ARG(lse_partial.dim(i) == out_partial.dim(i),
                 "lse_partial: shape dim " << i << " is " << lse_partial.dim(i)
                                           << ", out_partial's is " << out_partial.dim(i));
  }
  for (int i = 0; i < 4; ++i) {
    RA_CHECK_ARG(out.dim(i) == out_partial.dim(i + 1),
                 "out: shape dim " << i << " is " << out.dim(i) << ", expected "
                                   << out_partial.dim(i + 1) << " (out_partial's dim " << i + 1
                                   << ")");
  }
  for (int i = 0; i < 3; ++i) {
    RA_CHECK_ARG(
        lse.dim(i) == out_partial.dim(i + 1),
        "lse: shape dim " << i << " is " << lse.dim(i) << ", expected " << out_partial.dim(i + 1));
  }
  for (const TensorArg* t : {&out_partial, &out}) {
    RA_CHECK_ARG(t->dim(-1) <= 1 || t->stride(-1) == 1,
                 t->name << ": last dim must be contiguous, got stride " << t->stride(-1));
  }
  const int splits = static_cast<int>(out_partial.dim(0));
  const std::int64_t nb = out_partial.dim(1), ns = out_partial.dim(2), nh = out_partial.dim(3);
  const int d = static_cast<int>(out_partial.dim(4));
  const std::int64_t rows = nb * ns * nh;
  const float* op = out_partial.data<const float>();
  const float* lp = lse_partial.data<const float>();
  float* lo = lse.data<float>();
  char* ob = reinterpret_cast<char*>(out.ptr);
  const std::size_t osize = dtype_size(out_dtype);
  const std::vector<std::int64_t>& os = out_partial.strides;  // [split, b, s, h, d]
  const std::vector<std::int64_t>& ls = lse_partial.strides;  // [split, b, s, h]
  const std::vector<std::int64_t>& ds = out.strides;          // [b, s, h, d]
  const std::vector<std::int64_t>& es = lse.strides;          // [b, s, h]
  const int threads = engine()->threads();
  run_kernel([&] {
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> parts(static_cast<std::size_t>(splits) * static_cast<std::size_t>(d));
      std::vector<float> lses(static_cast<std::size_t>(splits));
      std::vector<float> row(static_cast<std::size_t>(d));
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t hi = r % nh, si = (r / nh) % ns, bi = r / (nh * ns);
        for (int sp = 0; sp < splits; ++sp) {
          const float* src = op + sp * os[0] + bi * os[1] + si * os[2] + hi * os[3];
          std::copy(src, src + d, parts.data() + static_cast<std::size_t>(sp) * d);
          lses[static_cast<std::size_t>(sp)] =
              lp[sp * ls[0] + bi * ls[1] + si * ls[2] + hi * ls[3]];
        }
        float row_lse = 0.0f;
        merge_states(parts.data(), lses.data(), row.data(), &row_lse, 1, splits, d);
        lo[bi * es[0] + si * es[1] + hi * es[2]] = row_lse;
        void* dst = ob + static_cast<std::size_t>(bi * ds[0] + si * ds[1] + hi * ds[2]) * osize;
        for (int c = 0; c < d; ++c)
          store_from_f32(dst, c, out_dtype, row[static_cast<std::size_t>(c)]);
      }
    }
  });
}

// ---- flash_attn_with_kvcache in one C++ call (the decode path) ----
//
// A decode step calls flash_attn_with_kvcache once per layer and token, so its Python
// overhead matters: this entry takes the Python arguments as they are, checks and
// converts them, allocates out / lse and runs fwd_kvcache, without the Python layer's
// helpers. It covers the common arguments (torch or numpy tensors of one kind, int32
// contiguous index tensors or an int cache_seqlens, no rotary tables). Anything else,
// and any argument that fails a check here, returns None: the Python implementation
// then runs and raises its own error, so both paths report bad input the same way.

// int32 [n] (or [n, m] when ndim = 2) contiguous index tensor of `ref`'s kind, or nullopt
// when `x` is None. Sets `ok` false for anything the fast path leaves to Python.
std::optional<TensorArg> fast_index(py::handle x, py::handle ref, const char* name, int ndim,
                                    bool& ok) {
  if (!ok || x.is_none()) return std::nullopt;
  if (!same_tensor_kind(x, ref)) {
    ok = false;
    return std::nullopt;
  }
  static const py::tuple& i32 = *new py::tuple(py::make_tuple(
      "i32", "i64", "fp32", "bf16", "fp16", "u8", "fp8"));  // leaked: outlives teardown
  TensorArg t = tensor_arg(x, name, i32, -1, "");
  if (t.type != ElemType::kI32 || t.ndim() != ndim) {
    ok = false;
    return std::nullopt;
  }
  std::int64_t want = 1;
  for (int i = t.ndim() - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != want) ok = false;
    want *= t.shape[i];
  }
  return t;
}

py::object kvcache_fast(py::handle q, py::handle k_cache, py::handle v_cache, py::handle k,
                        py::handle v, py::handle rotary_cos, py::handle rotary_sin,
                        py::handle cache_seqlens, py::handle cache_batch_idx,
                        py::handle cache_leftpad, py::handle page_table, py::handle softmax_scale,
                        py::handle causal, py::handle window_size, py::handle softcap,
                        py::handle scheduler_metadata, py::handle num_splits,
                        py::handle return_softmax_lse) {
  static const py::tuple& float_types = *new py::tuple(py::make_tuple(
      "fp32", "bf16", "fp16", "fp8", "i32", "i64", "u8"));  // leaked: outlives teardown
  const py::object fallback = py::none();
  // Everything before fwd_kvcache only decides whether this path applies: a failed
  // check hands the call to the Python implementation, which names the argument.
  std::optional<TensorArg> qa, kca, vca, ka, va, cs, cb, lp, pt, plan;
  std::vector<std::int32_t> seqlens_storage;
  float scale = 0.0f, cap = 0.0f;
  int wl = -1, wr = -1, splits = 0;
  bool is_causal = false, want_lse = false;
  try {
    if (!rotary_cos.is_none() || !rotary_sin.is_none() || !is_tensor(q)) return fallback;
    for (py::handle t : {k_cache, v_cache}) {
      if (!same_tensor_kind(t, q)) return fallback;
    }
    if (k.is_none() != v.is_none()) return fallback;
    if (!k.is_none() && (!same_tensor_kind(k, q) || !same_tensor_kind(v, q))) return fallback;
    if (!k.is_none() && (is_readonly_array(k_cache) || is_readonly_array(v_cache))) return fallback;
    qa = tensor_arg(q, "q", float_types, 4, "");
    kca = tensor_arg(k_cache, "k_cache", float_types, 4, "");
    vca = tensor_arg(v_cache, "v_cache", float_types, 4, "");
    if (!k.is_none()) {
      ka = tensor_arg(k, "k", float_types, 4, "");
      va = tensor_arg(v, "v", float_types, 4, "");
    }
    if (qa->type != ElemType::kF32 && qa->type != ElemType::kBF16 && qa->type != ElemType::kF16)
      return fallback;
    for (const auto* t : {&kca, &vca, &ka, &va}) {
      if (*t && (*t)->type != qa->type) return fallback;
    }
    const std::int64_t b = qa->dim(0), s_q = qa->dim(1), h = qa->dim(2), d = qa->dim(3);
    const std::int64_t d_v = vca->dim(3);
    for (std::int64_t n : {d, d_v}) {
      if (n % 8 || n < 8 || n > 256) return fallback;
    }
    if (b == 0 || s_q == 0 || h == 0) return fallback;

    bool ok = true;
    if (PyLong_CheckExact(cache_seqlens.ptr())) {
      const long long n = PyLong_AsLongLong(cache_seqlens.ptr());
      if (PyErr_Occurred()) {
        PyErr_Clear();
        return fallback;
      }
      if (n < INT32_MIN || n > INT32_MAX) return fallback;
      seqlens_storage.assign(static_cast<std::size_t>(b), static_cast<std::int32_t>(n));
      TensorArg t;
      t.name = "cache_seqlens";
      t.ptr = reinterpret_cast<std::uintptr_t>(seqlens_storage.data());
      t.type = ElemType::kI32;
      t.shape = {b};
      t.strides = {1};
      cs = std::move(t);
    } else if (cache_seqlens.is_none()) {
      return fallback;
    } else {
      cs = fast_index(cache_seqlens, q, "cache_seqlens", 1, ok);
    }
    cb = fast_index(cache_batch_idx, q, "cache_batch_idx", 1, ok);
    lp = fast_index(cache_leftpad, q, "cache_leftpad", 1, ok);
    pt = fast_index(page_table, q, "page_table", 2, ok);
    plan = fast_index(scheduler_metadata, q, "scheduler_metadata", 1, ok);
    if (!ok) return fallback;
    if (plan) {  // the Python path's lo = 1 check
      const auto* s = plan->data<const std::int32_t>();
      for (std::int64_t i = 0; i < plan->dim(0); ++i) {
        if (s[i] < 1) return fallback;
      }
    }

    // Scalars, with the Python helpers' rules (_scale, _softcap, window_pair, _num_splits).
    if (!softmax_scale.is_none()) {
      if (!PyFloat_Check(softmax_scale.ptr()) && !PyLong_CheckExact(softmax_scale.ptr()))
        return fallback;
      const double sv = py::cast<double>(softmax_scale);
      if (!std::isfinite(sv) || sv <= 0.0) return fallback;
      scale = static_cast<float>(sv);
    }
    if (!PyFloat_Check(softcap.ptr()) && !PyLong_CheckExact(softcap.ptr())) return fallback;
    const double cv = py::cast<double>(softcap);
    if (!std::isfinite(cv) || cv < 0.0) return fallback;
    cap = static_cast<float>(cv);
    if (!PyTuple_Check(window_size.ptr()) || PyTuple_GET_SIZE(window_size.ptr()) != 2)
      return fallback;
    for (int i = 0; i < 2; ++i) {
      py::handle w = PyTuple_GET_ITEM(window_size.ptr(), i);
      if (!PyLong_CheckExact(w.ptr())) return fallback;
      const long long wv = PyLong_AsLongLong(w.ptr());
      if (PyErr_Occurred()) {
        PyErr_Clear();
        return fallback;
      }
      if (wv < -1 || wv > INT32_MAX) return fallback;
      (i == 0 ? wl : wr) = static_cast<int>(wv);
    }
    if (!PyLong_CheckExact(num_splits.ptr())) return fallback;
    const long long ns = PyLong_AsLongLong(num_splits.ptr());
    if (PyErr_Occurred()) {
      PyErr_Clear();
      return fallback;
    }
    if (ns > INT32_MAX) return fallback;
    splits = ns > 0 ? static_cast<int>(ns) : 0;
    if (!PyBool_Check(causal.ptr()) || !PyBool_Check(return_softmax_lse.ptr())) return fallback;
    is_causal = causal.ptr() == Py_True;
    want_lse = return_softmax_lse.ptr() == Py_True;
  } catch (const py::error_already_set&) {
    return fallback;
  } catch (const py::builtin_exception&) {
    return fallback;
  } catch (const Error&) {
    return fallback;
  }

  const std::int64_t b = qa->dim(0), s_q = qa->dim(1), h = qa->dim(2), d_v = vca->dim(3);
  // Outputs: only the data pointer of the fresh tensors is asked for; the LSE only when
  // it is returned (the kernel skips it otherwise).
  py::object out = empty_tensor(q, {b, s_q, h, d_v}, qa->type);
  const TensorArg out_arg = fresh_tensor_arg(out, "out", {b, s_q, h, d_v}, qa->type);
  py::object lse;
  std::optional<TensorArg> lse_arg;
  if (want_lse) {
    lse = empty_tensor(q, {b, h, s_q}, ElemType::kF32);
    lse_arg = fresh_tensor_arg(lse, "softmax_lse", {b, h, s_q}, ElemType::kF32);
  }
  fwd_kvcache(*qa, *kca, *vca, ka, va, out_arg, lse_arg, *cs, cb, lp, pt, std::nullopt,
              std::nullopt, true, scale, is_causal, wl, wr, cap, splits, plan, std::nullopt, 0,
              std::nullopt, std::nullopt, 0, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
              std::nullopt);
  if (!want_lse) return out;
  py::object none0 = empty_tensor(q, {0}, ElemType::kF32);
  py::object none1 = empty_tensor(q, {0}, ElemType::kF32);
  return py::make_tuple(out, lse, none0, none1);
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("fwd", &fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("seqused_q"),
        py::arg("seqused_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"),
        py::arg("causal"), py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
        py::arg("num_splits"), py::arg("sinks") = py::none(), py::arg("attention_chunk") = 0,
        py::arg("q_descale") = py::none(), py::arg("k_descale") = py::none(),
        py::arg("v_descale") = py::none(), py::arg("qv") = py::none());
  m.def("fwd_kvcache", &fwd_kvcache, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cache_seqlens"),
        py::arg("cache_batch_idx"), py::arg("cache_leftpad"), py::arg("page_table"),
        py::arg("rotary_cos"), py::arg("rotary_sin"), py::arg("rotary_interleaved"),
        py::arg("scale"), py::arg("causal"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), py::arg("num_splits"), py::arg("plan"), py::arg("sinks") = py::none(),
        py::arg("attention_chunk") = 0, py::arg("rotary_seqlens") = py::none(),
        py::arg("cu_seqlens_q") = py::none(), py::arg("max_seqlen_q") = 0,
        py::arg("cu_seqlens_k_new") = py::none(), py::arg("q_descale") = py::none(),
        py::arg("k_descale") = py::none(), py::arg("v_descale") = py::none(),
        py::arg("qv") = py::none());
  m.def("kvcache_fast", &kvcache_fast, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("k"), py::arg("v"), py::arg("rotary_cos"), py::arg("rotary_sin"),
        py::arg("cache_seqlens"), py::arg("cache_batch_idx"), py::arg("cache_leftpad"),
        py::arg("page_table"), py::arg("softmax_scale"), py::arg("causal"), py::arg("window_size"),
        py::arg("softcap"), py::arg("scheduler_metadata"), py::arg("num_splits"),
        py::arg("return_softmax_lse"),
        "flash_attn_with_kvcache's common path in one call; None when the Python path must run.");
  m.def("plan_kvcache", &plan_kvcache, py::arg("b"), py::arg("s_q"), py::arg("s_cache"),
        py::arg("h"), py::arg("h_k"), py::arg("d"), py::arg("d_v"), py::arg("dtype"),
        py::arg("cache_seqlens"), py::arg("cache_leftpad"), py::arg("s_new"), py::arg("causal"),
        py::arg("window_left"), py::arg("window_right"), py::arg("softcap"), py::arg("num_splits"));
  m.def("combine", &combine, py::arg("out_partial"), py::arg("lse_partial"), py::arg("out"),
        py::arg("lse"));
}

}  // namespace ringattn::python
