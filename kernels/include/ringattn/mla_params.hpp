// DeepSeek MLA params (docs/semantics.md section 4): absorbed-form decode on a paged latent
// cache (dense or sparse) and sparse MLA prefill.
//
// Absorbed MLA is MQA with ONE latent KV head: per token the cache holds 576 values,
// the 512-value latent c followed by the 64-value shared rope key k_pe. Scores use all
// 576 values, V is the first 512:
//   score[r, j] = scale * (q[r, :576] . cache[j, :576])
//   out[r, :]   = sum_j softmax(score[r, :])_j * cache[j, :512]
//   lse[r]      = log(sum_j exp(score[r, j]))          (natural log)
// A query row that sees no key gets output 0 and LSE -inf.
// All tensors are contiguous in the shapes written next to each pointer.
#pragma once

#include <cstdint>

#include "ringattn/attention_params.hpp"

namespace ringattn {

inline constexpr int kMlaHeadDim = 576;  // 512 latent + 64 rope
inline constexpr int kMlaValueDim = 512;
inline constexpr int kMlaRopeDim = 64;
inline constexpr int kMlaMaxHeads = 128;       // h_q in [1, 128]
inline constexpr int kMlaMaxQueryTokens = 64;  // decode s_q in [1, 64] (multi-token prediction)
// Bytes per token of the FlashMLA fp8 layout: 512 e4m3 + 4 fp32 scales + 64 bf16.
inline constexpr int kMlaFp8PackedBytes = 656;

// How one token's latent vector sits in the cache.
enum class MlaCacheLayout : std::uint8_t {
  // 576 values of kv_dtype (fp32, bf16 or fp8 e4m3). With fp8 the FlashInfer scales
  // bmm1_scale / bmm2_scale are required (see MlaDecodeParams).
  kDense576,
  // FlashMLA per-token fp8 layout, 656 bytes a token (kv_dtype must be kFP8E4M3):
  //   bytes [0, 512)    512 e4m3 latent values
  //   bytes [512, 528)  4 fp32 scales, scale t multiplies latent values [128 t, 128 t + 128)
  //   bytes [528, 656)  64 bf16 rope values (unscaled)
  kFlashMlaFp8Packed656,
};

inline constexpr const char* mla_cache_layout_name(MlaCacheLayout l) {
  return l == MlaCacheLayout::kDense576 ? "dense576" : "flashmla_fp8_656";
}

// Absorbed-form MLA decode (FlashMLA flash_mla_with_kvcache / FlashInfer MLA decode).
//   q           [b, s_q, h_q, 576]      q_dtype fp32 or bf16
//   kv_cache    [num_blocks, page_size, 576] of kv_dtype (kDense576), or
//               [num_blocks, page_size, 656] bytes (kFlashMlaFp8Packed656)
//   block_table [b, max_blocks] int32: token t of sequence i lives at
//               kv_cache[block_table[i, t / page_size], t % page_size]
//   cache_seqlens [b] int32: tokens in the cache of each sequence (they include the
//               s_q query tokens themselves for multi-token prediction)
//   indices     [b, s_q, topk] int32, optional (sparse MLA, DeepSeek V3.2): global
//               slots (block * page_size + offset), -1 = padding; row (i, s) attends
//               to its listed tokens only (no causal mask, no block table needed)
//   out         [b, s_q, h_q, 512]      out_dtype fp32 or == q_dtype
//   lse         [b, h_q, s_q] fp32, natural log, nullable
//
//   topk_length [b] int32, optional (sparse only): sequence i uses only the first
//               topk_length[i] entries of each of its index rows, in [0, topk]
//   sinks       [h_q] fp32, optional: one attention-sink logit per query head
//   max_logits  [b, s_q, h_q] fp32, nullable: max over the row's visible keys of the
//               scaled score (-inf for a row that sees no key)
//
// Dense decode with causal: query token s of sequence i (cache length L) sees cache
// positions j <= L - s_q + s (bottom-right rule, docs/semantics.md section 1); when
// L < s_q the first s_q - L query tokens see no key (output 0, LSE -inf).
// Without causal every query token sees all L tokens.
//
// Sparse indices: by default an entry outside [-1, num_blocks * page_size) is an
// error. With invalid_indices_as_padding every entry outside [0, num_blocks *
// page_size) is skipped like -1 and never read (FlashMLA's rule: "-1 or >= s_kv").
//
// Sinks (docs/semantics.md section 7): after the split-KV merge, each output row of
// head h is multiplied by exp(lse) / (exp(lse) + exp(sinks[h])) exactly once; the
// returned LSE excludes the sink. sinks[h] = +inf gives output 0, -inf changes
// nothing, and a row that sees no key stays 0 / -inf. NaN is an error.
//
// Scaling (FlashInfer semantics):
//   score = bmm1_scale * (q . k_stored)   when bmm1_scale > 0 (it includes the softmax
//                                         scale: q_scale * k_scale * sm_scale)
//         = scale * (q . k)               otherwise (scale 0 = 1/sqrt(576))
//   out   = bmm2_scale * softmax . v_stored  when bmm2_scale > 0 (v_scale * o_scale)
// A dense fp8 cache (kDense576 + kFP8E4M3) stores value / k_scale, so bmm1_scale and
// bmm2_scale are both required there. Cache slots that no row reads may hold NaN.
struct MlaDecodeParams {
  DType q_dtype = DType::kF32;    // fp32 or bf16
  DType kv_dtype = DType::kF32;   // fp32, bf16 or fp8 (kFP8E4M3)
  DType out_dtype = DType::kF32;  // fp32 or == q_dtype
  MlaCacheLayout cache_layout = MlaCacheLayout::kDense576;

  const void* q = nullptr;         // [b, s_q, h_q, 576]
  const void* kv_cache = nullptr;  // [num_blocks, page_size, 576 | 656 bytes]
  void* out = nullptr;             // [b, s_q, h_q, 512]
  float* lse = nullptr;            // [b, h_q, s_q], nullable

  int b = 0, s_q = 0, h_q = 0;
  int head_dim = kMlaHeadDim;  // last dim of q and of a kDense576 cache: must be 576
  int num_blocks = 0, page_size = 0, max_blocks = 0;
  const std::int32_t* block_table = nullptr;    // [b, max_blocks] (dense decode)
  const std::int32_t* cache_seqlens = nullptr;  // [b] (dense decode)

  const std::int32_t* indices = nullptr;  // [b, s_q, topk], nullable (dense)
  int topk = 0;
  const std::int32_t* topk_length = nullptr;  // [b], nullable: used entries per index row
  bool invalid_indices_as_padding = false;    // true: out-of-range indices act as -1

  const float* sinks = nullptr;  // [h_q] fp32, nullable: attention-sink logit per head
  float* max_logits = nullptr;   // [b, s_q, h_q] fp32, nullable: max scaled score per row

  float scale = 0.0f;  // softmax scale; 0 = 1/sqrt(576)
  bool causal = false;
  float bmm1_scale = 0.0f;  // 0 = unset; > 0 replaces `scale` (fp8: q_scale * k_scale * sm_scale)
  float bmm2_scale = 0.0f;  // 0 = unset (1); > 0 multiplies the output (fp8: v_scale * o_scale)

  // Split-KV: 0 = engine decides (or `plan`), 1 = no split, n > 1 = n splits per
  // sequence. Changes speed only, never results beyond rounding.
  int num_splits = 0;
  const SchedulerMetadata* plan = nullptr;  // optional, from Engine::plan_mla_decode

  bool is_sparse() const { return indices != nullptr; }
};

// Global-index sparse prefill (FlashMLA flash_mla_sparse_fwd) is a sparse decode:
//   q [s_q, h_q, 576], kv [s_kv, 576], indices [s_q, topk] over [0, s_kv)
// run as MlaDecodeParams with b = s_q, s_q = 1, the kv as ONE block of page_size
// s_kv (num_blocks = 1, a global index is then the slot itself), topk_length [s_q],
// lse [s_q, h_q] (= [b, h_q, 1]) and max_logits [s_q, h_q]. The split plan runs one
// problem per query token, and every head of the token shares each key read.

// Which algorithm sparse MLA prefill runs (all give the same result to rounding).
enum class MlaPrefillPath : std::uint8_t {
  kAuto,          // the rule below
  kDenseCausal,   // plain causal attention; exact only when each row's indices are
                  // exactly {0, ..., i} (what the indexer selects when s <= topk)
  kMaskedDense,   // every key tile up to the row's largest index, bitmask of selected keys
  kSparseGather,  // gather each row's topk keys
};

inline constexpr const char* mla_prefill_path_name(MlaPrefillPath p) {
  switch (p) {
    case MlaPrefillPath::kAuto:
      return "auto";
    case MlaPrefillPath::kDenseCausal:
      return "dense_causal";
    case MlaPrefillPath::kMaskedDense:
      return "masked_dense";
    case MlaPrefillPath::kSparseGather:
      return "sparse_gather";
  }
  return "?";
}

// Sparse MLA prefill (DeepSeek V3.2 / vLLM): every sequence's tokens are both its
// queries and its keys, and query token i attends to the keys listed for it.
//   q        [total, h_q, 576]   dtype fp32 or bf16, total = cu_seqlens[b]
//   kv       [total, 576]        latent of the same tokens, dtype
//   indices  [total, topk] int32: sequence-LOCAL key positions in [0, s_i), -1 = pad,
//            no duplicates within a row
//   out      [total, h_q, 512]   fp32, lse [h_q, total] fp32 natural log (nullable)
//
// Path rule for kAuto (per call, s_max = longest sequence):
//   1. every row lists exactly its causal keys {0..i}      -> kDenseCausal
//      (checked; it holds whenever the indexer saw s_i <= topk)
//   2. else s_max <= masked_dense_max_ratio * topk          -> kMaskedDense
//   3. else                                                 -> kSparseGather
// masked_dense_max_ratio is a tunable, measured with `ringattn bench --case mla_prefill`.
struct MlaSparsePrefillParams {
  DType dtype = DType::kF32;  // q and kv: fp32 or bf16

  const void* q = nullptr;                   // [total, h_q, 576]
  const void* kv = nullptr;                  // [total, 576]
  const std::int32_t* cu_seqlens = nullptr;  // [b + 1]
  const std::int32_t* indices = nullptr;     // [total, topk]
  float* out = nullptr;                      // [total, h_q, 512]
  float* lse = nullptr;                      // [h_q, total], nullable

  int b = 0;
  int total = 0;
  int h_q = 0;
  int head_dim = kMlaHeadDim;  // last dim of q and kv: must be 576
  int topk = 0;
  float scale = 0.0f;  // 0 = 1/sqrt(576)

  MlaPrefillPath path = MlaPrefillPath::kAuto;
  float masked_dense_max_ratio = 1.0f;  // tunable for rule 2 (measured, docs/mla.md)
};

}  // namespace ringattn
