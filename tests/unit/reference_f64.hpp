// Independent attention reference for the test grids (qv included), written literally from
// docs/semantics.md sections 1-3 and 5 and the conventions in ringattn/attention_params.hpp.
// It reads the same params structs the Engine takes (pointers, strides, dtypes),
// so a test fills one struct and hands it to both.
//
// Two precisions:
//   kF64  the reference: inputs upcast to double, every step in double, output not
//         rounded.
//   kF32  the "low-precision" reference of the pt rule (docs/semantics.md section 6): the same
//         plain algorithm with fp32 accumulation, output rounded to out_dtype.
// Rotary embedding (KV cache) produces new q / k tensors in the storage dtype, as in
// FA: both precisions rotate in fp32 and round to p.dtype before attending.
//
// Result layouts (always contiguous):
//   dense / kvcache: out [b, s_q, h, d_v], lse [b, h, s_q]
//   varlen:          out [total_q, h, d_v], lse [h, total_q]
// Fully masked rows: out 0, lse -inf. Rows the kernel need not write (varlen rows
// past seqused_q) are NaN = "don't care" for the checks in test_util.hpp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ringattn/attention_params.hpp"

namespace ringattn::test {

enum class RefPrecision { kF64, kF32 };

struct RefResult {
  std::vector<double> out;
  std::vector<double> lse;
};

// docs/semantics.md sections 1-2: dense (p.cu_seqlens_q == nullptr) or varlen forward.
RefResult reference_forward(const FwdParams& p, RefPrecision prec = RefPrecision::kF64);

// reference_forward in float64 (ref) and in float32 (low), kept for the most recent case
// `name` (a grid runs one case on every backend in a row; case names are unique within
// the test binary).
struct CachedForwardRef {
  std::string name;
  RefResult ref, low;
};
inline const CachedForwardRef& cached_forward_references(const std::string& name,
                                                         const FwdParams& p) {
  static CachedForwardRef cache;
  if (cache.name != name) {
    cache.name = name;
    cache.ref = reference_forward(p, RefPrecision::kF64);
    cache.low = reference_forward(p, RefPrecision::kF32);
  }
  return cache;
}

// docs/semantics.md section 3. Reads the caches only at positions [leftpad, cache_seqlens)
// and takes appended keys from k_new/v_new, so it gives the same answer before or
// after the engine's in-place append. Does not modify the caches.
RefResult reference_kvcache(const KvCacheParams& p, RefPrecision prec = RefPrecision::kF64);

// Writes the expected in-place append of p.k_new/p.v_new into the cache buffers
// `k_cache` / `v_cache` (same geometry and strides as p's caches): new row r of
// sequence i goes to token cache_seqlens[i] + r, with rotary applied in fp32 to k
// at position cache_seqlens[i] + r (absolute slot as in FA3, leftpad included)
// when p.rotary_cos is set, then stored in p.dtype. Everything else is untouched.
void reference_kvcache_append(const KvCacheParams& p, void* k_cache, void* v_cache);

// Rotary embedding of one head vector in place, FA semantics (see
// KvCacheParams): interleaved pairs (x[2i], x[2i+1]) or half-split (x[i],
// x[i + rotary_dim/2]) rotated by cos/sin row `pos`; dims >= rotary_dim untouched.
template <typename T>
void apply_rotary(T* x, const float* cos, const float* sin, int rotary_dim, bool interleaved,
                  std::int64_t pos);

// docs/semantics.md section 5 in double: merge of n partial states per row.
//   o_parts [n, num_states, d_v], lse_parts [n, num_states] -> o [n, d_v], lse [n]
// +inf on input counts as empty; all-empty rows give o = 0, lse = -inf.
void reference_merge(const std::vector<double>& o_parts, const std::vector<double>& lse_parts,
                     std::int64_t n, int num_states, int d_v, std::vector<double>& o,
                     std::vector<double>& lse);

}  // namespace ringattn::test
