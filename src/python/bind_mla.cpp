// Bindings of DeepSeek MLA (docs/semantics.md section 4): absorbed-form decode on a
// paged latent cache, dense or sparse, which also serves FlashMLA's global-index
// sparse prefill (one query token per "sequence", the kv as one cache block). The
// Python side (ringattn/flash_mla_interface.py) checks argument kinds, reshapes the
// FlashMLA layouts to these and allocates outputs; this file checks that the tensors
// agree on shapes (naming both), fills MlaDecodeParams and runs the engine with the
// GIL released. The engine validates the rest.
// Python.h (through pybind11) comes before every other header: Python's configuration sets
// feature macros that the C and C++ standard headers read, and every translation unit of
// the module must see the same ones.
// clang-format off
#include <pybind11/pybind11.h>
// clang-format on

#include <cstdint>
#include <optional>
#include <vector>

#include "bind_common.hpp"
#include "ringattn/mla_params.hpp"

namespace ringattn::python {

namespace {

// [n] int32 contiguous index vector: its data, or null when absent.
const std::int32_t* int32_vector(const std::optional<TensorArg>& t, std::int64_t n,
                                 const char* what) {
  if (!t) return nullptr;
  RA_CHECK_ARG(t->type == ElemType::kI32,
               t->name << ": expected int32, got " << elem_type_name(t->type));
  t->expect_ndim(1, what);
  t->expect_dim(0, n, what);
  t->expect_contiguous();
  return t->data<const std::int32_t>();
}

// MLA decode:
//   q           [b, s_q, h_q, 576] fp32 | bf16, contiguous
//   k_cache     [num_blocks, page_size, 1, 576] fp32 | bf16, or with packed_fp8
//               [num_blocks, page_size, 1, 656] u8 | fp8 (FlashMLA's per-token layout)
//   out         [b, s_q, h_q, 512] fp32 | q's dtype;  lse [b, h_q, s_q] fp32 (nullable)
//   block_table [b, max_blocks] int32, cache_seqlens [b] int32 (dense)
//   indices     [b, s_q, topk] int32 (sparse), topk_length [b] int32 (sparse, nullable)
//   sinks       [h_q] fp32 (nullable), max_logits [b, s_q, h_q] fp32 (nullable)
//   plan        splits per decode problem from an earlier call (nullable)
// Returns the split plan when want_plan is set (computed here when none was given),
// else an empty list.
std::vector<std::int32_t> mla_decode(
    const TensorArg& q, const TensorArg& k_cache, const TensorArg& out,
    const std::optional<TensorArg>& lse, const std::optional<TensorArg>& block_table,
    const std::optional<TensorArg>& cache_seqlens, const std::optional<TensorArg>& indices,
    const std::optional<TensorArg>& topk_length, const std::optional<TensorArg>& sinks,
    const std::optional<TensorArg>& max_logits, float scale, bool causal, bool packed_fp8,
    bool invalid_indices_as_padding, const std::optional<std::vector<std::int32_t>>& plan,
    bool want_plan) {
  q.expect_ndim(4, "[b, s_q, h_q, 576]");
  k_cache.expect_ndim(4, "[num_blocks, page_block_size, 1, head_dim]");
  out.expect_ndim(4, "[b, s_q, h_q, 512]");
  for (const TensorArg* t : {&q, &k_cache, &out}) t->expect_contiguous();

  MlaDecodeParams p;
  p.b = static_cast<int>(q.dim(0));
  p.s_q = static_cast<int>(q.dim(1));
  p.h_q = static_cast<int>(q.dim(2));
  p.head_dim = static_cast<int>(q.dim(3));
  p.q_dtype = storage_dtype(q.type, q.name);
  p.out_dtype = storage_dtype(out.type, out.name);
  RA_CHECK_ARG(k_cache.dim(2) == 1, k_cache.name
                                        << ": MLA has one latent KV head, got num_heads_k = "
                                        << k_cache.dim(2));
  p.num_blocks = static_cast<int>(k_cache.dim(0));
  p.page_size = static_cast<int>(k_cache.dim(1));
  if (packed_fp8) {
    RA_CHECK_ARG(k_cache.type == ElemType::kU8 || k_cache.type == ElemType::kFP8E4M3,
                 k_cache.name << ": the fp8 cache holds bytes (uint8 or float8_e4m3fn), got "
                              << elem_type_name(k_cache.type));
    RA_CHECK_ARG(k_cache.dim(3) == kMlaFp8PackedBytes,
                 k_cache.name << ": last dim of the fp8 cache must be " << kMlaFp8PackedBytes
                              << " bytes (512 e4m3 + 4 fp32 scales + 64 bf16), got "
                              << k_cache.dim(3));
    p.kv_dtype = DType::kFP8E4M3;
    p.cache_layout = MlaCacheLayout::kFlashMlaFp8Packed656;
  } else {
    RA_CHECK_ARG(
        k_cache.type == ElemType::kF32 || k_cache.type == ElemType::kBF16,
        k_cache.name << ": dtype must be fp32 or bf16, got " << elem_type_name(k_cache.type));
    RA_CHECK_ARG(k_cache.dim(3) == p.head_dim, k_cache.name << ": head dim " << k_cache.dim(3)
                                                            << " must equal q's " << p.head_dim);
    p.kv_dtype = storage_dtype(k_cache.type, k_cache.name);
  }
  const std::int64_t want_out[4] = {p.b, p.s_q, p.h_q, kMlaValueDim};
  for (int i = 0; i < 4; ++i)
    RA_CHECK_ARG(out.dim(i) == want_out[i], out.name << ": shape dim " << i << " is " << out.dim(i)
                                                     << ", expected " << want_out[i]);
  p.q = q.data<const void>();
  p.kv_cache = k_cache.data<const void>();
  p.out = out.data<void>();
  if (lse) {
    RA_CHECK_ARG(lse->type == ElemType::kF32,
                 lse->name << ": expected fp32, got " << elem_type_name(lse->type));
    RA_CHECK_ARG(
        lse->ndim() == 3 && lse->dim(0) == p.b && lse->dim(1) == p.h_q && lse->dim(2) == p.s_q,
        lse->name << ": expected shape [b, h_q, s_q] = [" << p.b << ", " << p.h_q << ", " << p.s_q
                  << "]");
    lse->expect_contiguous();
    p.lse = lse->data<float>();
  }
  if (max_logits) {
    RA_CHECK_ARG(max_logits->type == ElemType::kF32,
                 max_logits->name << ": expected fp32, got " << elem_type_name(max_logits->type));
    RA_CHECK_ARG(max_logits->ndim() == 3 && max_logits->dim(0) == p.b &&
                     max_logits->dim(1) == p.s_q && max_logits->dim(2) == p.h_q,
                 max_logits->name << ": expected shape [b, s_q, h_q] = [" << p.b << ", " << p.s_q
                                  << ", " << p.h_q << "]");
    max_logits->expect_contiguous();
    p.max_logits = max_logits->data<float>();
  }
  if (indices) {
    RA_CHECK_ARG(indices->type == ElemType::kI32,
                 indices->name << ": expected int32, got " << elem_type_name(indices->type));
    indices->expect_ndim(3, "[b, s_q, topk]");
    indices->expect_dim(0, p.b, "batch, q's dim 0");
    indices->expect_dim(1, p.s_q, "query tokens, q's dim 1");
    indices->expect_contiguous();
    p.indices = indices->data<const std::int32_t>();
    p.topk = static_cast<int>(indices->dim(2));
    p.topk_length = int32_vector(topk_length, p.b, "[b]");
    p.invalid_indices_as_padding = invalid_indices_as_padding;
  } else {
    RA_CHECK_ARG(!topk_length, "topk_length: only used with sparse indices (indices is None)");
  }
  if (block_table) {
    RA_CHECK_ARG(block_table->type == ElemType::kI32, block_table->name
                                                          << ": expected int32, got "
                                                          << elem_type_name(block_table->type));
    block_table->expect_ndim(2, "[b, max_num_blocks_per_seq]");
    block_table->expect_dim(0, p.b, "batch, q's dim 0");
    block_table->expect_contiguous();
    p.block_table = block_table->data<const std::int32_t>();
    p.max_blocks = static_cast<int>(block_table->dim(1));
  }
  p.cache_seqlens = int32_vector(cache_seqlens, p.b, "[b]");
  if (sinks) {
    RA_CHECK_ARG(sinks->type == ElemType::kF32,
                 sinks->name << ": expected fp32, got " << elem_type_name(sinks->type));
    sinks->expect_ndim(1, "[h_q]");
    sinks->expect_dim(0, p.h_q, "query heads, q's dim 2");
    sinks->expect_contiguous();
    p.sinks = sinks->data<const float>();
  }
  p.scale = scale;
  p.causal = causal;

  auto eng = engine();
  SchedulerMetadata md;
  if (plan) {
    md.b = static_cast<int>(plan->size());
    md.threads = eng->threads();
    md.num_splits = *plan;
    p.plan = &md;
  }
  run_kernel([&] {
    if (want_plan && p.plan == nullptr) {
      md = eng->plan_mla_decode(p);
      p.plan = &md;
    }
    eng->mla_decode(p);
  });
  return want_plan ? md.num_splits : std::vector<std::int32_t>{};
}

}  // namespace

void register_mla(py::module_& m) {
  m.def("mla_decode", &mla_decode, py::arg("q"), py::arg("k_cache"), py::arg("out"), py::arg("lse"),
        py::arg("block_table"), py::arg("cache_seqlens"), py::arg("indices"),
        py::arg("topk_length"), py::arg("sinks"), py::arg("max_logits"), py::arg("scale"),
        py::arg("causal"), py::arg("packed_fp8"), py::arg("invalid_indices_as_padding"),
        py::arg("plan"), py::arg("want_plan"));
}

}  // namespace ringattn::python
