// The optimised CPU attention kernels behind cpu_backend.cpp (internal).
//
// cpu_backend.cpp turns FwdParams (dense / varlen) and KvCacheParams (dense or paged
// cache, after the append of kvcache_prepare.hpp) into one AttnProblem: a list of
// independent sequences, each with its own lengths, mask diagonal and key/value row
// addressing. One entry point per SIMD ISA runs it; each is the same template
// (flash_fwd_tile.hpp) instantiated in flash_fwd_cpu_<isa>.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kvcache_prepare.hpp"
#include "ringattn/attention_params.hpp"
#include "ringattn/buffer_pool.hpp"

namespace ringattn::detail::cpu {

// Rows of one K or V tensor of one sequence. Either contiguous rows (varlen / dense
// tensors: key t at t * row_stride) or a KV cache, resolved through the shared
// kvcache_prepare.hpp helpers (page table, cache_batch_idx, leftpad).
struct KvRows {
  const char* base = nullptr;            // tensor base (bytes); contiguous: row of key 0
  std::int64_t row_stride = 0;           // elements, contiguous mode only
  std::int64_t head_stride = 0;          // elements, contiguous mode only
  const KvCacheParams* cache = nullptr;  // cache mode when set
  int seq = 0;                           // cache mode: batch index
  bool is_v = false;                     // cache mode: v_cache instead of k_cache
};

// One independent attention problem (one batch element / varlen segment).
//   query row i of head hq lives at q + q_off + i * q_row_stride + hq * q_head_stride
//   (same for out), its LSE at lse[lse_off + hq * lse_head_stride + i].
struct SeqDesc {
  int s_q = 0;             // query rows computed
  int s_q_slots = 0;       // rows of the output slot (>= s_q); rows past s_q get 0 / -inf
  std::int64_t s_k = 0;    // keys
  std::int64_t shift = 0;  // mask diagonal: key j is on the diagonal of row i when j == i + shift
  // attention_chunk positions: row i at q_pos + i * pos_stride, key j at k_pos + j * pos_stride
  // (default q_pos = shift, k_pos = 0, stride 1; MaskParams::chunk_q_pos).
  std::int64_t q_pos = 0, k_pos = 0;
  std::int64_t q_off = 0, out_off = 0, lse_off = 0;
  std::int64_t qv_off = 0;  // qv row i of head hq: qv + qv_off + i * qv_row_stride + ...
  KvRows k, v;
  int num_splits = 1;  // key splits (>= 1)
  int batch = 0;       // batch element / varlen segment / cache sequence (fp8 descale row)
};

struct AttnProblem {
  DType dtype = DType::kF32;      // storage of q, k, v
  DType out_dtype = DType::kF32;  // kF32 or dtype
  int h = 0, h_k = 0, d = 0, d_v = 0;
  const void* q = nullptr;  // [.., h, d]
  std::int64_t q_row_stride = 0, q_head_stride = 0;
  void* out = nullptr;  // [.., h, d_v]
  std::int64_t out_row_stride = 0, out_head_stride = 0;
  float* lse = nullptr;  // nullable
  std::int64_t lse_head_stride = 0;
  // FA3 qv [.., h, d_v] in `dtype`, nullable: score = scale * (q . k + qv . v).
  const void* qv = nullptr;
  std::int64_t qv_row_stride = 0, qv_head_stride = 0;
  float scale = 1.0f;            // resolved (never 0)
  float softcap = 0.0f;          // 0 = off
  int w_left = -1;               // -1 = unbounded
  int w_right = -1;              // causal already folded in (0)
  int chunk = 0;                 // attention_chunk, 0 = off
  int chunk_stride = 1;          // MaskParams::chunk_stride
  const float* sinks = nullptr;  // [h] attention-sink logits, nullable (applied in write_row)
  std::vector<SeqDesc> seqs;
  ProgressHook progress;          // polled by the calling thread (progress_throttle.hpp)
  BufferPool* pool = nullptr;     // large per-call buffers kept between calls; nullable
  bool decode_key_major = false;  // fp32 decode tile order (EngineOptions::decode_order)

  // fp8 e4m3 storage only (empty otherwise), [b, h_k] per batch element and KV head:
  // fp8_qk = 256^2 * q_descale * k_descale multiplies the query row (with the scale),
  // fp8_v = 256 * v_descale the output row; the 256s undo the value / 256 of the
  // kernels' e4m3 loads (simd_math.hpp kFp8ViaHalfScale).
  std::vector<float> fp8_qk, fp8_v;
  float qk_factor(const SeqDesc& sd, int hk) const {
    return fp8_qk.empty() ? 1.0f : fp8_qk[static_cast<std::size_t>(sd.batch) * h_k + hk];
  }
  float v_factor(const SeqDesc& sd, int hk) const {
    return fp8_v.empty() ? 1.0f : fp8_v[static_cast<std::size_t>(sd.batch) * h_k + hk];
  }
};

// Helpers used by the generic backend and by the ISA translation units live in an
// unnamed namespace: every translation unit gets its own copy, so code compiled with
// AVX-512 flags is never picked by the linker for a caller on another path.
namespace {

// Element offset of key t (0-based within the sequence) of KV head hk.
inline std::int64_t kv_rows_offset(const KvRows& kv, std::int64_t t, int hk) {
  if (kv.cache)
    return kv.is_v ? kv_v_offset(*kv.cache, kv.seq, t, hk) : kv_k_offset(*kv.cache, kv.seq, t, hk);
  return t * kv.row_stride + hk * kv.head_stride;
}

// Keys t, t + 1, .. (at most n) whose rows follow each other at kv_row_stride(kv):
// all n for a dense tensor or an unpaged cache, the rest of t's page for a paged one.
inline std::int64_t kv_rows_run(const KvRows& kv, std::int64_t t, std::int64_t n) {
  if (!kv.cache || !kv.cache->page_table) return n;
  const std::int64_t slot = kv_leftpad(*kv.cache, kv.seq) + t;
  return std::min(n, kv.cache->page_size - slot % kv.cache->page_size);
}
// Elements between the rows of two consecutive keys within such a run.
inline std::int64_t kv_row_stride(const KvRows& kv) {
  if (kv.cache) return kv.is_v ? kv.cache->v_cache_row_stride : kv.cache->k_cache_row_stride;
  return kv.row_stride;
}

// Elements between the rows of two consecutive KV heads of one key.
inline std::int64_t kv_head_stride(const KvRows& kv) {
  if (kv.cache) return kv.is_v ? kv.cache->v_cache_head_stride : kv.cache->k_cache_head_stride;
  return kv.head_stride;
}

// ---- scheduling constants shared by the kernels and the planner ----

// Keys per tile of both kernels (a multiple of every ISA's micro-kernel width).
inline constexpr int kKeyTile = 64;
// Keys per tile of the decode kernels (each divides kKeyTile): the head-major tile of
// 2-byte K/V, and the key-major tile of fp32 K/V (64 keys: 3 ns less per key and head
// than 16 in per-tile work, and 5-8 points more of the read loop on 2 threads).
inline constexpr int kDecodeKeyTile = 16;
inline constexpr int kDecodeKeyMajorTile = 64;
// The decode kernels prefetch the K/V rows this many tiles ahead, spread over the
// loads of the current tile.
inline constexpr int kDecodePrefetchTiles = 2;
inline constexpr int kDecodeKeyMajorPrefetchTiles = 1;
// Rows (query rows x heads of one KV group) of one prefill task: Q, O (fp32) and the
// score tile of 256 rows stay within a 512 KiB L2 for d = d_v = 128.
inline constexpr int kPrefillRows = 256;
// At or below this many rows per KV head (s_q * h / h_k) the decode kernel runs.
inline constexpr int kDecodeMaxRows = 16;
// Smallest number of keys a split should get (smaller splits cost more in the merge
// than they gain in parallelism).
inline constexpr int kMinKeysPerSplit = 256;

// A sequence runs the decode kernel when its rows per KV head (query rows x heads of
// one group) are at most kDecodeMaxRows.
inline bool is_decode(int s_q, int group) { return s_q * group <= kDecodeMaxRows; }

inline int query_block_rows(int s_q, int group) {
  if (is_decode(s_q, group)) return std::max(s_q, 1);
  return std::clamp(kPrefillRows / group, 1, std::max(s_q, 1));
}

inline int num_query_blocks(int s_q, int group) {
  const int mq = query_block_rows(s_q, group);
  return (s_q + mq - 1) / mq;
}

// A decode task covers several KV heads, so that it reads each key's [h_k, d] row
// as one contiguous piece (rows of a single head sit h_k * d elements apart: a page
// per key, TLB-bound). Up to kPrefillRows query rows a task.
inline int decode_heads_per_task(int s_q, int group, int h_k) {
  return std::clamp(kPrefillRows / std::max(1, s_q * group), 1, std::max(h_k, 1));
}

// Tasks of one sequence before key splitting.
inline std::int64_t unsplit_tasks(int s_q, int h, int h_k) {
  const int group = h / h_k;
  if (s_q <= 0) return 0;
  if (is_decode(s_q, group)) {
    const int hpt = decode_heads_per_task(s_q, group, h_k);
    return (h_k + hpt - 1) / hpt;
  }
  return std::int64_t{h_k} * num_query_blocks(s_q, group);
}

// Split-KV heuristic (FA3 num_splits_heuristic in spirit): when the tasks without
// splits (`base_tasks` = sum over sequences of h_k * query blocks) cannot keep every
// thread busy, cut each sequence's keys into enough splits that there are about two
// tasks per thread (the dynamic schedule then balances), never below
// kMinKeysPerSplit keys a split.
inline int choose_num_splits(std::int64_t s_k, std::int64_t base_tasks, int threads) {
  const std::int64_t target = 2 * std::int64_t{threads};
  if (base_tasks <= 0 || base_tasks >= target || s_k <= kMinKeysPerSplit) return 1;
  const std::int64_t want = (target + base_tasks - 1) / base_tasks;
  const std::int64_t cap = std::max<std::int64_t>(1, s_k / kMinKeysPerSplit);
  return static_cast<int>(std::clamp<std::int64_t>(want, 1, std::min<std::int64_t>(cap, 128)));
}

}  // namespace

// Out-of-line helpers defined in cpu_backend.cpp (generic code), so that the ISA
// translation units emit no shared inline code of their own:
// dst[off + c] = src[c] * mul for c < n, stored as `t` (round to nearest even).
void store_row_converted(void* dst, std::int64_t off, DType t, const float* src, float mul, int n);
[[noreturn]] void throw_scratch_alloc_failure(std::size_t bytes);

// A scratch buffer from `pool` (nullable) or ResourceError naming the size.
inline void take_scratch(BufferPool* pool, std::size_t bytes, BufferPool::Lease& lease) {
  if (!BufferPool::take(pool, bytes, lease)) throw_scratch_alloc_failure(bytes);
}
[[noreturn]] void throw_unsupported_dtype(DType t);

// Entry points, one per ISA (flash_fwd_cpu_<isa>.cpp).
void flash_fwd_scalar(const AttnProblem& p, int threads);
void flash_fwd_avx2(const AttnProblem& p, int threads);
void flash_fwd_avx512(const AttnProblem& p, int threads);
// bf16 storage only (the tier's other dtypes run flash_fwd_avx512): AVX-512 vector
// code with the prefill products on a matrix engine; decode stays on AVX-512.
// cpu-amx: AMX tiles (flash_fwd_cpu_amx.cpp).
void flash_fwd_amx(const AttnProblem& p, int threads);
// cpu-avx512-bf16: vdpbf16ps (flash_fwd_cpu_avx512_bf16.cpp).
void flash_fwd_avx512_bf16(const AttnProblem& p, int threads);
// fp8 e4m3 storage on cpu-avx512-bf16 and cpu-amx where the CPU has AVX512_VBMI: decode
// on vdpbf16ps (decode_fp8_dpbf16.hpp), prefill on the AVX-512 vector kernels
// (flash_fwd_cpu_fp8_avx512_bf16_vbmi.cpp).
void flash_fwd_fp8_avx512_bf16_vbmi(const AttnProblem& p, int threads);

}  // namespace ringattn::detail::cpu
