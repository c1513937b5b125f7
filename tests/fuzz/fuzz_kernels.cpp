// libFuzzer target for the kernel layer's public API: argument validation and small
// kernel calls (dense, varlen, KV cache with paging/append/rotary, attention sinks, FA3
// qv, MLA decode, merge).
//
// Each input decodes into one call with small shapes. Buffers are allocated to match
// the decoded shapes and strides; their padding and every cache slot that no query
// may read hold NaN. The decoder also produces garbage (negative or overlapping
// strides, out-of-range page tables, indices and lengths, NaN options) that
// validation must reject. Invariants, any violation aborts:
//  - only ringattn::InvalidArgument / UnsupportedError may escape a call;
//  - no out-of-bounds access or undefined behaviour (ASan + UBSan);
//  - an accepted call writes every output element, finite, and LSE finite or -inf,
//    with output 0 on rows whose LSE is -inf; nothing outside the outputs changes;
//  - with moderate magnitudes the optimised backend matches the reference backend.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "fuzz_common.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/mla_params.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn::fuzz {
namespace {

constexpr const char* kTarget = "fuzz_kernels";
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Engines {
  Engine reference{EngineOptions{"reference", 1}};
  std::unique_ptr<Engine> cpu1, cpu2;  // optimised backend, 1 and 2 threads
  Engines() {
    cpu1 = std::make_unique<Engine>(EngineOptions{"auto", 1});
    cpu2 = std::make_unique<Engine>(EngineOptions{"auto", 2});
  }
};

Engines& engines() {
  static Engines e;
  return e;
}

// Output rows that must be written by an accepted call, compared across backends.
struct Result {
  std::vector<float> out;  // required output elements in a fixed order
  std::vector<float> lse;  // required LSE elements in the same row order
};

void check_row(const std::vector<float>& row, float lse) {
  if (std::isnan(lse) || lse == kInf) fail(kTarget, "LSE is NaN or +inf");
  for (float v : row) {
    if (!std::isfinite(v)) fail(kTarget, "output element is not finite (unwritten or read NaN)");
    if (lse == -kInf && v != 0.0f) fail(kTarget, "row with LSE -inf has non-zero output");
  }
}

// Loose cross-backend comparison; only used where scores are moderate, so that
// summation order cannot legitimately move the softmax weights.
void compare(const Result& a, const Result& b, float out_tol) {
  if (a.out.size() != b.out.size() || a.lse.size() != b.lse.size()) fail(kTarget, "result size");
  for (std::size_t i = 0; i < a.out.size(); ++i)
    if (!(std::fabs(a.out[i] - b.out[i]) <= out_tol))
      fail(kTarget, "optimised backend output differs from reference");
  for (std::size_t i = 0; i < a.lse.size(); ++i) {
    if (a.lse[i] == -kInf || b.lse[i] == -kInf) {
      if (a.lse[i] != b.lse[i]) fail(kTarget, "backends disagree on an empty row");
      continue;
    }
    if (!(std::fabs(a.lse[i] - b.lse[i]) <= 1e-3f * (1.0f + std::fabs(a.lse[i]))))
      fail(kTarget, "optimised backend LSE differs from reference");
  }
}

// `e` ran storage `dtype`; the matrix engines on bf16 storage (cpu-amx, cpu-avx512-bf16:
// what "auto" picks on a CPU with AMX or AVX512_BF16) round P to bf16: up to
// 2^-8 * max|V| more (|V| <= 1 here).
float out_tolerance(DType out_dtype, DType dtype, const Engine& e) {
  const float base = out_dtype == DType::kF32 ? 2e-3f : 3e-2f;
  const bool engine = e.backend_name() == "cpu-amx" || e.backend_name() == "cpu-avx512-bf16";
  return engine && dtype == DType::kBF16 ? base + 0x1p-8f : base;
}

constexpr std::array<DType, 5> kDTypes{DType::kF32, DType::kF32, DType::kBF16, DType::kF16,
                                       DType::kFP8E4M3};
constexpr std::array<float, 8> kScales{0.0f, 0.0f, 0.125f, 1.0f, -0.5f, 1e4f, kNaN, kInf};
constexpr std::array<float, 6> kSoftcaps{0.0f, 0.0f, 15.0f, 0.5f, -1.0f, kNaN};
constexpr std::array<int, 6> kWindows{-1, -1, 0, 1, 3, -2};
constexpr std::array<int, 8> kHeadDims{8, 16, 32, 8, 16, 0, 12, 264};
constexpr std::array<int, 8> kChunks{0, 0, 0, 0, 1, 3, 8, -1};  // attention_chunk

constexpr std::array<float, 8> kSinks{-kInf, kInf, kNaN, 0.0f, 2.5f, -3.0f, 40.0f, -40.0f};

// Optional attention-sink logits [h] for a quarter of the calls (NaN must be rejected,
// +inf zeroes a head, -inf is no sink); nullptr otherwise. `storage` owns the values.
const float* decode_sinks(FuzzBytes& in, int h, std::vector<float>& storage) {
  if (h <= 0 || in.u8() % 4 != 0) return nullptr;
  storage.resize(static_cast<std::size_t>(h));
  for (float& x : storage) x = in.pick(kSinks);
  return storage.data();
}

// fp8 descales, one value per (batch element, KV head): NaN / inf must be rejected, and
// so must descales on a non-fp8 dtype. Products stay <= 2.25, so scores stay moderate.
constexpr std::array<float, 8> kDescales{1.0f, 0.5f, 1.5f, 0.0f, 0.125f, -1.0f, kNaN, kInf};

// Optional q/k/v descales [b, h_k] (batch stride h_k, or 0 = one broadcast row) for a
// quarter of the calls, whatever the dtype; `storage` owns the values.
void decode_descale(FuzzBytes& in, int b, int h_k, std::vector<float>& storage, Fp8Descale& ds) {
  if (b <= 0 || h_k <= 0 || in.u8() % 4 != 0) return;
  storage.resize(static_cast<std::size_t>(3 * b * h_k));
  for (float& x : storage) x = in.pick(kDescales);
  const std::int64_t stride = in.flag() ? h_k : 0;
  const float* base = storage.data();
  if (in.flag()) ds.q = base;
  if (in.flag()) ds.k = base + b * h_k;
  if (in.flag()) ds.v = base + 2 * b * h_k;
  ds.q_batch_stride = ds.k_batch_stride = ds.v_batch_stride = stride;
}

MaskParams decode_mask(FuzzBytes& in) {
  MaskParams m;
  m.scale = in.pick(kScales);
  m.softcap = in.pick(kSoftcaps);
  m.causal = in.flag();
  m.window_left = in.pick(kWindows);
  m.window_right = in.pick(kWindows);
  m.attention_chunk = in.pick(kChunks);
  return m;
}

// Scores stay moderate (|score| << 100) so both backends must agree closely.
bool moderate(const MaskParams& m, float magnitude) {
  return magnitude <= 1.0f && std::fabs(m.scale) <= 1.0f;
}

// Required-written elements of a [rows..., h, d_v] output: (row offset, lse index).
struct RowRef {
  std::int64_t out_off;  // offset of element 0 of the row
  std::int64_t lse_idx;  // index into the lse buffer
};

Result collect(const StridedTensor& out, const std::vector<float>& lse,
               const std::vector<RowRef>& rows, int d_v) {
  Result r;
  std::vector<float> row(static_cast<std::size_t>(d_v));
  for (const RowRef& rr : rows) {
    for (int c = 0; c < d_v; ++c) row[static_cast<std::size_t>(c)] = out.get(rr.out_off + c);
    const float l = lse[static_cast<std::size_t>(rr.lse_idx)];
    check_row(row, l);
    r.out.insert(r.out.end(), row.begin(), row.end());
    r.lse.push_back(l);
  }
  return r;
}

// Re-poisons the logical output elements and checks nothing else was written.
void check_no_stray_writes(StridedTensor& out) {
  for_each_element(out, [&](std::int64_t off) { store_nan(out.data(), off, out.dtype); });
  if (!all_poison(out)) fail(kTarget, "kernel wrote outside the output's logical elements");
}

// ---- dense and varlen forward ----

void fuzz_forward(FuzzBytes& in, bool varlen) {
  FwdParams p;
  p.dtype = in.pick(kDTypes);
  p.out_dtype = in.flag() ? DType::kF32 : in.pick(kDTypes);
  p.b = in.range(0, 3);
  p.s_q = in.range(0, 9);
  p.s_k = in.range(0, 12);
  p.h = in.range(0, 4);
  p.h_k = in.range(0, 3);
  p.d = in.pick(kHeadDims);
  p.d_v = in.flag() ? p.d : in.pick(kHeadDims);
  p.mask = decode_mask(in);
  p.num_splits = in.range(-1, 4);
  const float magnitude = in.flag() ? 1.0f : 1e4f;  // 1e4: huge scores
  Rng rng(in.u8());
  if (p.b < 0 || p.s_q < 0 || p.s_k < 0 || p.h < 0 || p.h_k < 0 || p.d < 0 || p.d_v < 0) return;

  std::vector<std::int32_t> cu_q, cu_k, used_q, used_k;
  std::vector<std::int64_t> chunk_q_pos, chunk_k_pos;
  std::vector<std::int64_t> shift;
  // Varlen tensors are [total, h, *]: rank 4 with a leading dim of 1. Allocate the
  // largest total the max_seqlen bounds allow; longer segments must be rejected.
  const std::int64_t rows_q = varlen ? std::int64_t{p.b} * p.s_q : p.s_q;
  const std::int64_t rows_k = varlen ? std::int64_t{p.b} * p.s_k : p.s_k;
  const std::int64_t batch = varlen ? 1 : p.b;
  if (varlen) {
    auto make_cu = [&](std::vector<std::int32_t>& cu, int max_len, std::int64_t total) {
      cu.assign(static_cast<std::size_t>(p.b) + 1, 0);
      const bool garbage = in.u8() % 5 == 0;
      for (int i = 1; i <= p.b; ++i) {
        cu[static_cast<std::size_t>(i)] =
            garbage ? in.range(-2, static_cast<int>(total) + 3)
                    : cu[static_cast<std::size_t>(i) - 1] + in.range(0, max_len);
      }
      if (garbage && in.flag()) cu[0] = in.range(-1, 2);
    };
    make_cu(cu_q, p.s_q, rows_q);
    make_cu(cu_k, p.s_k, rows_k);
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
    if (in.u8() % 3 == 0) {
      for (int i = 0; i < p.b; ++i) used_q.push_back(in.range(-1, p.s_q + 1));
      p.seqused_q = used_q.data();
    }
    if (in.u8() % 3 == 0) {
      for (int i = 0; i < p.b; ++i) used_k.push_back(in.range(-1, p.s_k + 1));
      p.seqused_k = used_k.data();
    }
  }
  if (in.u8() % 4 == 0) {
    constexpr std::array<std::int64_t, 6> kShifts{
        0, 3, -5, 11, std::int64_t{1} << 40, -(std::int64_t{1} << 40)};
    for (int i = 0; i < p.b; ++i) shift.push_back(in.pick(kShifts));
    p.mask.mask_shift = shift.data();
  }
  if (in.u8() % 4 == 0) {  // attention_chunk positions (a block of a longer sequence)
    constexpr std::array<std::int64_t, 6> kPos{
        0, 7, -9, 1000, std::int64_t{1} << 40, std::int64_t{1} << 61};  // 2^61: rejected
    constexpr std::array<int, 4> kStrides{1, 1, 3, 0};                  // 0: rejected
    for (int i = 0; i < p.b; ++i) {
      chunk_q_pos.push_back(in.pick(kPos));
      chunk_k_pos.push_back(in.pick(kPos));
    }
    p.mask.chunk_q_pos = chunk_q_pos.data();
    p.mask.chunk_k_pos = in.u8() % 8 == 0 ? nullptr : chunk_k_pos.data();  // nullptr: rejected
    p.mask.chunk_stride = in.pick(kStrides);
  }
  std::vector<float> sinks;
  p.mask.sinks = decode_sinks(in, p.h, sinks);
  if (p.dtype == DType::kFP8E4M3 && in.flag()) p.dtype = DType::kF16;
  std::vector<float> descales;
  decode_descale(in, p.b, p.h_k, descales, p.descale);

  StridedTensor q, k, v, out;
  const int h = p.h, hk = p.h_k;
  const int dq = std::max(p.d, 0), dv = std::max(p.d_v, 0);
  if (!make_tensor(in, q, p.dtype, {batch, rows_q, h, dq}) ||
      !make_tensor(in, k, p.dtype, {batch, rows_k, hk, dq}) ||
      !make_tensor(in, v, p.dtype, {batch, rows_k, hk, dv}) ||
      !make_tensor(in, out, p.out_dtype, {batch, rows_q, h, dv}))
    return;
  fill_finite(q, rng, magnitude);
  fill_finite(k, rng, magnitude);
  fill_finite(v, rng, magnitude);
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.q_batch_stride = q.stride[0], p.q_row_stride = q.stride[1], p.q_head_stride = q.stride[2];
  p.k_batch_stride = k.stride[0], p.k_row_stride = k.stride[1], p.k_head_stride = k.stride[2];
  p.v_batch_stride = v.stride[0], p.v_row_stride = v.stride[1], p.v_head_stride = v.stride[2];
  p.out_batch_stride = out.stride[0], p.out_row_stride = out.stride[1],
  p.out_head_stride = out.stride[2];
  const std::int64_t lse_size = std::max<std::int64_t>(std::int64_t{h} * rows_q * batch, 1);
  std::vector<float> lse(static_cast<std::size_t>(lse_size), kNaN);
  const bool with_lse = in.u8() % 4 != 0;
  if (with_lse) p.lse = lse.data();
  const int engine_choice = in.u8() % 3;
  // FA3 qv, shaped as out (any strides the decoder makes; bad ones must be rejected).
  StridedTensor qv;
  if (in.u8() % 3 == 0 && make_tensor(in, qv, p.dtype, {batch, rows_q, h, dv})) {
    fill_finite(qv, rng, magnitude);
    p.qv = qv.data();
    p.qv_batch_stride = qv.stride[0], p.qv_row_stride = qv.stride[1],
    p.qv_head_stride = qv.stride[2];
  }

  const Engine& ref = engines().reference;
  const Engine& opt = engine_choice == 0 ? *engines().cpu1 : *engines().cpu2;
  try {
    ref.forward(p);
  } catch (const InvalidArgument&) {
    return;
  } catch (const UnsupportedError&) {
    return;
  }
  // Accepted: the rows every backend must write.
  std::vector<RowRef> rows;
  for (int bi = 0; bi < (varlen ? p.b : batch); ++bi) {
    std::int64_t begin = 0, used = p.s_q;
    if (varlen) {
      begin = cu_q[static_cast<std::size_t>(bi)];
      used = cu_q[static_cast<std::size_t>(bi) + 1] - begin;
      if (p.seqused_q) used = std::min<std::int64_t>(used, used_q[static_cast<std::size_t>(bi)]);
    }
    for (std::int64_t r = 0; r < used; ++r)
      for (int hi = 0; hi < h; ++hi) {
        const std::int64_t row = begin + r;
        const std::int64_t lse_idx =
            varlen ? std::int64_t{hi} * cu_q[static_cast<std::size_t>(p.b)] + row
                   : (std::int64_t{bi} * h + hi) * p.s_q + row;
        rows.push_back({out.offset(varlen ? 0 : bi, row, hi, 0), lse_idx});
      }
  }
  if (!with_lse) std::fill(lse.begin(), lse.end(), 0.0f);
  const Result a = collect(out, lse, rows, dv);
  check_no_stray_writes(out);

  if (!moderate(p.mask, magnitude)) return;
  poison_all(out);
  std::fill(lse.begin(), lse.end(), with_lse ? kNaN : 0.0f);
  try {
    opt.forward(p);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    fail(kTarget, "optimised backend rejected a call the reference accepted");
  }
  compare(a, collect(out, lse, rows, dv), out_tolerance(p.out_dtype, p.dtype, opt));
  check_no_stray_writes(out);
}

// ---- KV cache ----

// RINGATTN_FUZZ_VERBOSE=1 prints each decoded KV-cache call (to turn a crash into a
// readable regression test).
bool verbose() {
  static const bool v = std::getenv("RINGATTN_FUZZ_VERBOSE") != nullptr;
  return v;
}

template <typename T>
void dump_array(const char* name, const T* a, std::int64_t n) {
  std::fprintf(stderr, " %s=[", name);
  if (a == nullptr) {
    std::fprintf(stderr, "null]");
    return;
  }
  for (std::int64_t i = 0; i < n; ++i)
    std::fprintf(stderr, "%s%lld", i ? "," : "", static_cast<long long>(a[i]));
  std::fprintf(stderr, "]");
}

void dump(const KvCacheParams& p, const std::vector<std::int32_t>& page_table,
          const StridedTensor& kc, const StridedTensor& vc) {
  std::fprintf(
      stderr,
      "kvcache: dtype=%s out=%s b=%d s_q=%d h=%d h_k=%d d=%d d_v=%d s_new=%d b_cache=%d "
      "s_cache=%d paged=%d num_blocks=%d page_size=%d max_pages=%d pt_stride=%lld "
      "k_new=%d v_new=%d rotary_dim=%d s_rotary=%d causal=%d wl=%d wr=%d splits=%d plan=%d\n",
      dtype_name(p.dtype), dtype_name(p.out_dtype), p.b, p.s_q, p.h, p.h_k, p.d, p.d_v, p.s_new,
      p.b_cache, p.s_cache, p.is_paged(), p.num_blocks, p.page_size, p.max_pages,
      static_cast<long long>(p.page_table_batch_stride), p.k_new != nullptr, p.v_new != nullptr,
      p.rotary_cos ? p.rotary_dim : 0, p.s_rotary, p.mask.causal, p.mask.window_left,
      p.mask.window_right, p.num_splits, p.plan != nullptr);
  std::fprintf(stderr,
               " k_cache strides=[%lld,%lld,%lld] elements=%lld v_cache strides=[%lld,%lld,%lld] "
               "elements=%lld",
               static_cast<long long>(kc.stride[0]), static_cast<long long>(kc.stride[1]),
               static_cast<long long>(kc.stride[2]), static_cast<long long>(kc.capacity()),
               static_cast<long long>(vc.stride[0]), static_cast<long long>(vc.stride[1]),
               static_cast<long long>(vc.stride[2]), static_cast<long long>(vc.capacity()));
  dump_array("cache_seqlens", p.cache_seqlens, p.b);
  dump_array("cache_batch_idx", p.cache_batch_idx, p.b);
  dump_array("cache_leftpad", p.cache_leftpad, p.b);
  dump_array("page_table", p.page_table, static_cast<std::int64_t>(page_table.size()));
  if (p.plan)
    dump_array("plan.num_splits", p.plan->num_splits.data(),
               static_cast<std::int64_t>(p.plan->num_splits.size()));
  std::fprintf(stderr, "\n");
}

void fuzz_kvcache(FuzzBytes& in) {
  KvCacheParams p;
  p.dtype = in.pick(kDTypes);
  if (p.dtype == DType::kFP8E4M3 && in.flag()) p.dtype = DType::kBF16;
  p.out_dtype = in.flag() ? DType::kF32 : p.dtype == DType::kFP8E4M3 ? DType::kBF16 : p.dtype;
  p.b = in.range(0, 3);
  p.s_q = in.range(0, 4);
  p.h = in.range(0, 4);
  p.h_k = in.range(0, 2);
  p.d = in.pick(kHeadDims);
  p.d_v = in.flag() ? p.d : in.pick(kHeadDims);
  p.s_new = in.u8() % 3 == 0 ? in.range(0, 3) : 0;
  p.mask = decode_mask(in);
  p.num_splits = in.range(-1, 4);
  const bool paged = in.flag();
  const float magnitude = in.u8() % 4 == 0 ? 1e4f : 1.0f;
  Rng rng(in.u8());
  if (p.b < 0 || p.s_q < 0 || p.h < 0 || p.h_k < 0 || p.d < 0 || p.d_v < 0) return;
  const int b = p.b, h = p.h, hk = p.h_k;
  std::vector<float> sinks;
  p.mask.sinks = decode_sinks(in, h, sinks);
  std::vector<float> descales;
  decode_descale(in, p.b, p.h_k, descales, p.descale);

  std::vector<std::int32_t> page_table, seqlens, batch_idx, leftpad;
  std::int64_t cache_batches = 0, cache_rows = 0, capacity = 0;
  p.b_cache = in.range(0, 4);
  if (paged) {
    p.num_blocks = in.range(0, 6);
    p.page_size = in.pick(std::array<int, 6>{1, 2, 3, 4, 8, 0});
    p.max_pages = in.range(0, 5);
    p.page_table_batch_stride = in.u8() % 6 == 0 ? in.range(-2, 7) : p.max_pages;
    const std::int64_t pt_rows = std::max(b, p.b_cache);
    // page_table is [rows, max_pages] with rows page_table_batch_stride apart: the last
    // row still holds max_pages entries whatever the stride.
    const std::int64_t pt_size = std::max<std::int64_t>(
        (pt_rows - 1) * std::max<std::int64_t>(p.page_table_batch_stride, 0) + p.max_pages, 1);
    const bool garbage = in.u8() % 4 == 0;
    for (std::int64_t i = 0; i < pt_size; ++i)
      page_table.push_back(garbage ? in.range(-2, p.num_blocks + 1)
                                   : in.range(0, std::max(p.num_blocks - 1, 0)));
    p.page_table = page_table.data();
    cache_batches = p.num_blocks;
    cache_rows = p.page_size;
    capacity = std::int64_t{p.max_pages} * p.page_size;
  } else {
    p.s_cache = in.range(0, 12);
    cache_batches = p.b_cache;
    cache_rows = p.s_cache;
    capacity = p.s_cache;
  }
  if (cache_rows < 0) return;
  const bool garbage_lengths = in.u8() % 4 == 0;
  for (int i = 0; i < b; ++i) {
    seqlens.push_back(garbage_lengths ? in.range(-1, static_cast<int>(capacity) + 2)
                                      : in.range(0, static_cast<int>(std::max<std::int64_t>(
                                                        capacity - p.s_new, 0))));
  }
  p.cache_seqlens = in.u8() % 16 == 0 ? nullptr : seqlens.data();
  if (in.u8() % 3 == 0) {
    for (int i = 0; i < b; ++i)
      batch_idx.push_back(
          in.range(garbage_lengths ? -1 : 0, std::max(p.b_cache - (garbage_lengths ? 0 : 1), 0)));
    p.cache_batch_idx = batch_idx.data();
  }
  if (in.u8() % 3 == 0) {
    for (int i = 0; i < b; ++i)
      leftpad.push_back(in.range(garbage_lengths ? -1 : 0,
                                 seqlens[static_cast<std::size_t>(i)] + (garbage_lengths ? 1 : 0)));
    p.cache_leftpad = leftpad.data();
  }

  StridedTensor q, kc, vc, kn, vn, out;
  const int dq = std::max(p.d, 0), dv = std::max(p.d_v, 0);
  if (!make_tensor(in, q, p.dtype, {b, p.s_q, h, dq}) ||
      !make_tensor(in, kc, p.dtype, {cache_batches, cache_rows, hk, dq}) ||
      !make_tensor(in, vc, p.dtype, {cache_batches, cache_rows, hk, dv}) ||
      !make_tensor(in, kn, p.dtype, {b, std::max(p.s_new, 0), hk, dq}) ||
      !make_tensor(in, vn, p.dtype, {b, std::max(p.s_new, 0), hk, dv}) ||
      !make_tensor(in, out, p.out_dtype, {b, p.s_q, h, dv}))
    return;
  fill_finite(q, rng, magnitude);
  fill_finite(kn, rng, magnitude);
  fill_finite(vn, rng, magnitude);
  // Only the slots a sequence may read get finite values; the rest stay NaN.
  bool duplicate_rows = false;
  if (p.cache_seqlens && kc.valid_layout && vc.valid_layout) {
    std::vector<int> owner(
        static_cast<std::size_t>(std::max<std::int64_t>(cache_batches * cache_rows, 1)), -1);
    // Rows two appended keys write (a page table repeating a page): which write lands
    // last is up to the backend's schedule, so the outputs may differ.
    std::vector<char> appended(owner.size(), 0);
    for (int i = 0; i < b; ++i) {
      const std::int64_t row = p.cache_batch_idx ? batch_idx[static_cast<std::size_t>(i)] : i;
      const std::int64_t lp = p.cache_leftpad ? leftpad[static_cast<std::size_t>(i)] : 0;
      for (std::int64_t t = std::max<std::int64_t>(lp, 0);
           t < seqlens[static_cast<std::size_t>(i)] + std::max(p.s_new, 0); ++t) {
        std::int64_t blk = row, slot = t;
        if (paged) {
          if (p.page_size <= 0 || t / p.page_size >= p.max_pages) break;
          const std::int64_t pt_idx = row * p.page_table_batch_stride + t / p.page_size;
          if (row < 0 || pt_idx < 0 || pt_idx >= static_cast<std::int64_t>(page_table.size()))
            break;
          blk = page_table[static_cast<std::size_t>(pt_idx)];
          slot = t % p.page_size;
        }
        if (blk < 0 || blk >= cache_batches || slot >= cache_rows) break;
        const std::size_t phys = static_cast<std::size_t>(blk * cache_rows + slot);
        const bool append = t >= seqlens[static_cast<std::size_t>(i)];
        int& o = owner[phys];
        if (o != -1 && (o != i || (append && appended[phys]))) duplicate_rows = true;
        o = i;
        if (append) appended[phys] = 1;
        for (int hh = 0; hh < hk; ++hh) {
          for (int c = 0; c < dq; ++c)
            kc.set(kc.offset(blk, slot, hh, c), magnitude * rng.uniform());
          for (int c = 0; c < dv; ++c)
            vc.set(vc.offset(blk, slot, hh, c), magnitude * rng.uniform());
        }
      }
    }
  }
  p.q = q.data();
  p.k_cache = kc.data();
  p.v_cache = vc.data();
  if (p.s_new > 0 || in.u8() % 8 == 0) {
    p.k_new = kn.data();
    p.v_new = in.u8() % 16 == 0 ? nullptr : vn.data();
  }
  p.out = out.data();
  p.q_batch_stride = q.stride[0], p.q_row_stride = q.stride[1], p.q_head_stride = q.stride[2];
  p.k_cache_batch_stride = kc.stride[0], p.k_cache_row_stride = kc.stride[1],
  p.k_cache_head_stride = kc.stride[2];
  p.v_cache_batch_stride = vc.stride[0], p.v_cache_row_stride = vc.stride[1],
  p.v_cache_head_stride = vc.stride[2];
  p.k_new_batch_stride = kn.stride[0], p.k_new_row_stride = kn.stride[1],
  p.k_new_head_stride = kn.stride[2];
  p.v_new_batch_stride = vn.stride[0], p.v_new_row_stride = vn.stride[1],
  p.v_new_head_stride = vn.stride[2];
  p.out_batch_stride = out.stride[0], p.out_row_stride = out.stride[1],
  p.out_head_stride = out.stride[2];

  std::vector<float> cos_table, sin_table;
  if (in.u8() % 4 == 0) {
    p.rotary_dim = in.pick(std::array<int, 6>{2, 4, 8, 16, 3, 40});
    p.s_rotary = in.range(0, 20);
    p.rotary_interleaved = in.flag();
    const std::size_t n = static_cast<std::size_t>(std::max(p.s_rotary, 1)) *
                          static_cast<std::size_t>(std::max(p.rotary_dim / 2, 1));
    for (std::size_t i = 0; i < n; ++i) {
      const float angle = 3.0f * rng.uniform();
      cos_table.push_back(std::cos(angle));
      sin_table.push_back(std::sin(angle));
    }
    p.rotary_cos = cos_table.data();
    p.rotary_sin = sin_table.data();
  }
  // FA3 rotary_seqlens (also without rotary tables: must be rejected), garbage included.
  std::vector<std::int32_t> rot_seqlens;
  if (b > 0 && in.u8() % 4 == 0) {
    for (int i = 0; i < b; ++i) rot_seqlens.push_back(in.range(-1, 12));
    p.rotary_seqlens = rot_seqlens.data();
  }

  // Variable lengths (cu_seqlens_q / cu_seqlens_k_new): the [b, s, ...] tensors read as
  // packed [b * s, ...] rows, only when their batch stride is s row strides (the packed
  // rows then stay inside the allocation); segments up to s, or garbage.
  std::vector<std::int32_t> cu_q, cu_new;
  const auto packed_cu = [&](std::vector<std::int32_t>& cu, int max_len) {
    cu.assign(1, 0);
    const bool garbage = in.u8() % 5 == 0;
    for (int i = 0; i < b; ++i)
      cu.push_back(garbage ? in.range(-1, b * max_len + 1) : cu.back() + in.range(0, max_len));
    return cu.data();
  };
  if (b > 0 && p.s_q > 0 && in.u8() % 4 == 0 && q.stride[0] == p.s_q * q.stride[1] &&
      out.stride[0] == p.s_q * out.stride[1])
    p.cu_seqlens_q = packed_cu(cu_q, p.s_q);
  if (b > 0 && p.k_new && p.s_new > 0 && in.u8() % 4 == 0 &&
      kn.stride[0] == p.s_new * kn.stride[1] && vn.stride[0] == p.s_new * vn.stride[1])
    p.cu_seqlens_k_new = packed_cu(cu_new, p.s_new);

  // FA3 qv, shaped as out (packed like q and out with cu_seqlens_q), sometimes.
  StridedTensor qv;
  if (in.u8() % 3 == 0 && make_tensor(in, qv, p.dtype, {b, p.s_q, h, dv}) &&
      (!p.cu_seqlens_q || qv.stride[0] == p.s_q * qv.stride[1])) {
    fill_finite(qv, rng, magnitude);
    p.qv = qv.data();
    p.qv_batch_stride = qv.stride[0], p.qv_row_stride = qv.stride[1],
    p.qv_head_stride = qv.stride[2];
  }

  std::vector<float> lse(static_cast<std::size_t>(std::max(b * h * p.s_q, 1)), kNaN);
  p.lse = lse.data();
  const Engine& ref = engines().reference;
  const Engine& opt = in.flag() ? *engines().cpu1 : *engines().cpu2;

  // Optional scheduler plan: from plan_kvcache, or garbage that must be rejected or ignored.
  SchedulerMetadata plan;
  const int plan_mode = in.u8() % 4;
  if (plan_mode == 1) {
    try {
      plan = opt.plan_kvcache(p);
    } catch (const InvalidArgument&) {
      return;
    }
    p.plan = &plan;
  } else if (plan_mode == 2) {
    plan.b = in.range(-1, 4);
    plan.threads = in.range(-1, 3);
    const int n = in.range(0, 4);
    for (int i = 0; i < n; ++i) plan.num_splits.push_back(in.range(-1, 100));
    p.plan = &plan;
  }

  if (verbose()) dump(p, page_table, kc, vc);
  try {
    ref.forward_kvcache(p);
  } catch (const InvalidArgument&) {
    return;
  } catch (const UnsupportedError&) {
    return;
  }
  std::vector<RowRef> rows;
  if (p.cu_seqlens_q) {
    // Packed rows g < cu_seqlens_q[b]: out row g of the [b * s_q] view, lse [h, total_q].
    const std::int64_t total = cu_q[static_cast<std::size_t>(b)];
    for (std::int64_t g = 0; g < total; ++g)
      for (int hi = 0; hi < h; ++hi)
        rows.push_back({out.offset(g / p.s_q, g % p.s_q, hi, 0), hi * total + g});
  } else {
    for (int bi = 0; bi < b; ++bi)
      for (int r = 0; r < p.s_q; ++r)
        for (int hi = 0; hi < h; ++hi)
          rows.push_back({out.offset(bi, r, hi, 0), (std::int64_t{bi} * h + hi) * p.s_q + r});
  }
  const Result a = collect(out, lse, rows, dv);
  check_no_stray_writes(out);

  if (!moderate(p.mask, magnitude) || duplicate_rows) return;
  poison_all(out);
  std::fill(lse.begin(), lse.end(), kNaN);
  try {
    opt.forward_kvcache(p);  // the append writes the same values again
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    fail(kTarget, "optimised backend rejected a call the reference accepted");
  }
  compare(a, collect(out, lse, rows, dv), out_tolerance(p.out_dtype, p.dtype, opt));
  check_no_stray_writes(out);
}

// ---- MLA decode ----

void fuzz_mla(FuzzBytes& in) {
  MlaDecodeParams p;
  p.q_dtype = in.pick(kDTypes);
  p.kv_dtype = in.pick(kDTypes);
  p.out_dtype = in.flag() ? DType::kF32 : p.q_dtype;
  p.cache_layout =
      in.u8() % 4 == 0 ? MlaCacheLayout::kFlashMlaFp8Packed656 : MlaCacheLayout::kDense576;
  if (p.cache_layout == MlaCacheLayout::kFlashMlaFp8Packed656 && in.u8() % 4 != 0)
    p.kv_dtype = DType::kFP8E4M3;
  p.b = in.range(0, 2);
  p.s_q = in.range(0, 3);
  p.h_q = in.pick(std::array<int, 6>{1, 2, 3, 16, 0, 129});
  p.num_blocks = in.range(0, 4);
  p.page_size = in.pick(std::array<int, 5>{1, 2, 4, 16, 0});
  p.max_blocks = in.range(0, 4);
  p.causal = in.flag();
  p.scale = in.pick(kScales);
  constexpr std::array<float, 6> kBmm{0.0f, 0.0f, 0.05f, 1.0f, -1.0f, kNaN};
  p.bmm1_scale = in.pick(kBmm);
  p.bmm2_scale = in.pick(kBmm);
  p.num_splits = in.range(-1, 3);
  Rng rng(in.u8());
  if (p.b < 0 || p.s_q < 0 || p.h_q < 0 || p.num_blocks < 0 || p.page_size < 0 || p.max_blocks < 0)
    return;
  const bool packed = p.cache_layout == MlaCacheLayout::kFlashMlaFp8Packed656;
  const std::int64_t token_bytes =
      packed ? kMlaFp8PackedBytes : kMlaHeadDim * static_cast<std::int64_t>(dtype_size(p.kv_dtype));
  const std::int64_t slots = std::int64_t{p.num_blocks} * p.page_size;
  if (slots * token_bytes > kMaxTensorElements * 4) return;

  // Cache all NaN; readable tokens get finite values below.
  GuardedBuffer cache;
  cache.assign(static_cast<std::size_t>(std::max<std::int64_t>(slots * token_bytes, 1)));
  auto fill_token = [&](std::int64_t slot, bool finite) {
    unsigned char* t = cache.data() + slot * token_bytes;
    if (packed) {
      for (int i = 0; i < kMlaValueDim; ++i) t[i] = finite ? f32_to_fp8e4m3(rng.uniform()) : 0x7f;
      for (int i = 0; i < 4; ++i) {
        const float s = finite ? 0.5f + 0.5f * rng.uniform() : kNaN;
        std::memcpy(t + kMlaValueDim + 4 * i, &s, 4);
      }
      for (int i = 0; i < kMlaRopeDim; ++i) {
        const std::uint16_t v = f32_to_bf16(finite ? rng.uniform() : kNaN);
        std::memcpy(t + kMlaValueDim + 16 + 2 * i, &v, 2);
      }
    } else {
      for (int i = 0; i < kMlaHeadDim; ++i)
        store_from_f32(t, i, p.kv_dtype, finite ? rng.uniform() : kNaN);
    }
  };
  for (std::int64_t s = 0; s < slots; ++s) fill_token(s, false);

  std::vector<std::int32_t> block_table, seqlens, indices;
  const bool garbage = in.u8() % 4 == 0;
  const std::int64_t bt_size = std::max<std::int64_t>(std::int64_t{p.b} * p.max_blocks, 1);
  for (std::int64_t i = 0; i < bt_size; ++i)
    block_table.push_back(garbage ? in.range(-2, p.num_blocks + 1)
                                  : in.range(0, std::max(p.num_blocks - 1, 0)));
  const int cap = p.max_blocks * p.page_size;
  for (int i = 0; i < p.b; ++i)
    seqlens.push_back(garbage ? in.range(-1, cap + 2) : in.range(0, std::max(cap, 0)));
  p.block_table = block_table.data();
  p.cache_seqlens = seqlens.data();
  const bool sparse = in.u8() % 3 == 0;
  if (sparse) {
    p.topk = in.pick(std::array<int, 5>{1, 4, 8, 0, -1});
    const std::int64_t n =
        std::max<std::int64_t>(std::int64_t{p.b} * p.s_q * std::max(p.topk, 0), 1);
    for (std::int64_t i = 0; i < n; ++i)
      indices.push_back(
          garbage ? in.range(-2, static_cast<int>(slots) + 1)
                  : (in.u8() % 4 == 0
                         ? -1
                         : in.range(0, static_cast<int>(std::max<std::int64_t>(slots - 1, 0)))));
    p.indices = indices.data();
    for (std::int32_t s : indices)
      if (s >= 0 && s < slots) fill_token(s, true);
  } else {
    for (int i = 0; i < p.b; ++i)
      for (int t = 0; t < seqlens[static_cast<std::size_t>(i)]; ++t) {
        if (p.page_size <= 0 || t / p.page_size >= p.max_blocks) break;
        const std::int32_t blk =
            block_table[static_cast<std::size_t>(i) * static_cast<std::size_t>(p.max_blocks) +
                        static_cast<std::size_t>(t / p.page_size)];
        if (blk < 0 || blk >= p.num_blocks) break;
        fill_token(std::int64_t{blk} * p.page_size + t % p.page_size, true);
      }
  }
  p.kv_cache = cache.data();

  // MLA tensors are contiguous by contract.
  StridedTensor q, out;
  make_contiguous(q, p.q_dtype, {p.b, p.s_q, p.h_q, kMlaHeadDim});
  make_contiguous(out, p.out_dtype, {p.b, p.s_q, p.h_q, kMlaValueDim});
  fill_finite(q, rng, 1.0f);
  p.q = q.data();
  p.out = out.data();
  std::vector<float> lse(static_cast<std::size_t>(std::max(p.b * p.h_q * p.s_q, 1)), kNaN);
  p.lse = lse.data();

  const Engine& ref = engines().reference;
  const Engine& opt = in.flag() ? *engines().cpu1 : *engines().cpu2;
  try {
    ref.mla_decode(p);
  } catch (const InvalidArgument&) {
    return;
  } catch (const UnsupportedError&) {
    return;
  }
  std::vector<RowRef> rows;
  for (int bi = 0; bi < p.b; ++bi)
    for (int r = 0; r < p.s_q; ++r)
      for (int hi = 0; hi < p.h_q; ++hi)
        rows.push_back({out.offset(bi, r, hi, 0), (std::int64_t{bi} * p.h_q + hi) * p.s_q + r});
  const Result a = collect(out, lse, rows, kMlaValueDim);
  if (std::fabs(p.scale) > 1.0f || std::fabs(p.bmm1_scale) > 1.0f) return;
  poison_all(out);
  std::fill(lse.begin(), lse.end(), kNaN);
  try {
    opt.mla_decode(p);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    fail(kTarget, "optimised backend rejected an MLA call the reference accepted");
  }
  // On the matrix tiers bf16 q with a dense bf16 or fp8 cache runs bf16 products (P rounded
  // to bf16, |V| <= 1 here); everything else the fp32 tiles.
  const bool bf16_products = p.q_dtype == DType::kBF16 && !packed &&
                             (p.kv_dtype == DType::kBF16 || p.kv_dtype == DType::kFP8E4M3);
  compare(a, collect(out, lse, rows, kMlaValueDim),
          out_tolerance(p.out_dtype, bf16_products ? DType::kBF16 : DType::kF32, opt));
}

// ---- softmax-state merge (docs/semantics.md section 5) ----

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

void fuzz_merge(FuzzBytes& in) {
  const int n = in.range(0, 4);
  const int d_v = in.range(0, 8);
  const int num_states = in.range(0, 4);
  constexpr std::array<float, 8> kLse{-kInf, kInf, 0.0f, 1.5f, -80.0f, 80.0f, 30.0f, -3.0f};
  Rng rng(in.u8());
  const auto rows = static_cast<std::size_t>(n);
  const auto width = static_cast<std::size_t>(d_v);
  std::vector<float> oa(rows * width), ob(rows * width), la(rows), lb(rows);
  for (auto& x : oa) x = rng.uniform();
  for (auto& x : ob) x = rng.uniform();
  for (auto& x : la) x = in.pick(kLse);
  for (auto& x : lb) x = in.pick(kLse);
  std::vector<float> o(rows * width, kNaN), l(rows, kNaN);
  merge_state(oa.data(), la.data(), ob.data(), lb.data(), o.data(), l.data(), n, d_v);
  for (std::size_t r = 0; r < rows; ++r) {
    const double a = canonical_lse(la[r]), b = canonical_lse(lb[r]);
    if (a == -INFINITY && b == -INFINITY) {
      if (l[r] != -kInf) fail(kTarget, "merge of two empty states is not empty");
      for (std::size_t c = 0; c < width; ++c)
        if (o[r * width + c] != 0.0f)
          fail(kTarget, "merge of two empty states has non-zero output");
      continue;
    }
    const double m = std::max(a, b);
    const double lse = m + std::log(std::exp(a - m) + std::exp(b - m));
    if (!(std::fabs(l[r] - lse) <= 1e-5 * (1.0 + std::fabs(lse)))) fail(kTarget, "merge LSE");
    for (std::size_t c = 0; c < width; ++c) {
      const double ref =
          oa[r * width + c] * std::exp(a - lse) + ob[r * width + c] * std::exp(b - lse);
      if (!(std::fabs(o[r * width + c] - ref) <= 1e-5)) fail(kTarget, "merge output");
    }
  }
  // In-place form must equal the out-of-place form bit for bit.
  std::vector<float> oi = oa, li = la;
  merge_state_inplace(oi.data(), li.data(), ob.data(), lb.data(), n, d_v);
  if (!same_bits(oi, o) || !same_bits(li, l))
    fail(kTarget, "merge_state_inplace differs from merge_state");

  // N-way merge: empty rows 0 / -inf, otherwise finite.
  const auto states = static_cast<std::size_t>(num_states);
  std::vector<float> parts(rows * states * width), lparts(rows * states);
  for (auto& x : parts) x = rng.uniform();
  for (auto& x : lparts) x = in.pick(kLse);
  std::vector<float> on(rows * width, kNaN), ln(rows, kNaN);
  merge_states(parts.data(), lparts.data(), on.data(), ln.data(), n, num_states, d_v);
  for (std::size_t r = 0; r < rows; ++r) {
    bool empty = true;
    for (std::size_t s = 0; s < states; ++s)
      empty = empty && canonical_lse(lparts[r * states + s]) == -kInf;
    if (std::isnan(ln[r]) || ln[r] == kInf) fail(kTarget, "merge_states LSE NaN or +inf");
    if (empty != (ln[r] == -kInf)) fail(kTarget, "merge_states emptiness");
    for (std::size_t c = 0; c < width; ++c) {
      const float v = on[r * width + c];
      if (!std::isfinite(v) || (empty && v != 0.0f)) fail(kTarget, "merge_states output");
    }
  }
}

}  // namespace
}  // namespace ringattn::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace ringattn::fuzz;
  FuzzBytes in(data, size);
  try {
    switch (in.u8() % 5) {
      case 0:
        fuzz_forward(in, false);
        break;
      case 1:
        fuzz_forward(in, true);
        break;
      case 2:
        fuzz_kvcache(in);
        break;
      case 3:
        fuzz_mla(in);
        break;
      default:
        fuzz_merge(in);
        break;
    }
  } catch (const ringattn::InvalidArgument&) {
  } catch (const ringattn::UnsupportedError&) {
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_kernels: unexpected exception: %s\n", e.what());
    std::abort();
  }
  return 0;
}
