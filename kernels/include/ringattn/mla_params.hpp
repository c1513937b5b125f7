// DeepSeek MLA decode params (SPEC.md section 4). Owned by the MLA work; this is
// the initial shape of the struct.
#pragma once

#include <cstdint>

#include "ringattn/attention_params.hpp"

namespace ringattn {

inline constexpr int kMlaHeadDim = 576;  // 512 latent + 64 rope
inline constexpr int kMlaValueDim = 512;

// Absorbed-form MLA decode: MQA with one latent KV head.
//   q           [b, s_q, h_q, 576]
//   kv_cache    [num_blocks, page_size, 576]  (V = first 512 values)
//   block_table [b, max_blocks] int32, cache_seqlens [b] int32
//   indices     [b, s_q, topk] int32 global slots (block * page_size + offset), -1 = pad
//   out         [b, s_q, h_q, 512], lse [b, h_q, s_q] natural log
struct MlaDecodeParams {
  DType q_dtype = DType::kF32;
  DType kv_dtype = DType::kF32;
  DType out_dtype = DType::kF32;

  const void* q = nullptr;
  const void* kv_cache = nullptr;
  void* out = nullptr;
  float* lse = nullptr;

  int b = 0, s_q = 0, h_q = 0;
  int num_blocks = 0, page_size = 0, max_blocks = 0;
  const std::int32_t* block_table = nullptr;
  const std::int32_t* cache_seqlens = nullptr;

  const std::int32_t* indices = nullptr;  // nullable (dense)
  int topk = 0;

  float scale = 0.0f;  // 0 = 1/sqrt(576)
  bool causal = false;
  float bmm1_scale = 1.0f;  // fp8: q_scale * k_scale (multiplies scores with scale)
  float bmm2_scale = 1.0f;  // fp8: v_scale * o_scale (multiplies output)

  int num_splits = 0;
};

}  // namespace ringattn
