// MLA kernels behind the backends (internal). Backends route Engine::mla_decode and
// Engine::mla_sparse_prefill here; Engine::plan_mla_decode (shape-only) calls
// mla_plan_decode directly.
#pragma once

#include "cpu_features.hpp"
#include "ringattn/attention_params.hpp"
#include "ringattn/mla_params.hpp"

namespace ringattn::detail {

// Plain loops in double precision; what the tests compare against.
void mla_decode_reference(const MlaDecodeParams& p, int threads);

// Optimised CPU path for the given tier (mla_decode.cpp): the vector tiles of its ISA, or
// the bf16 products (vdpbf16ps or AMX) where decode_uses_bf16_path (mla_internal.hpp) says so.
void mla_decode_cpu(const MlaDecodeParams& p, CpuIsa isa, int threads);

// Split-KV plan: num_splits has one entry per decode problem (b for dense decode,
// b * s_q for sparse decode, where every query token has its own key list).
SchedulerMetadata mla_plan_decode(const MlaDecodeParams& p, int threads);

// Sparse MLA prefill (mla_sparse_prefill.cpp).
void mla_sparse_prefill_reference(const MlaSparsePrefillParams& p, int threads);
void mla_sparse_prefill_cpu(const MlaSparsePrefillParams& p, CpuIsa isa, int threads);
// The path kAuto resolves to (documented in mla_params.hpp); p.path if not kAuto.
MlaPrefillPath mla_choose_prefill_path(const MlaSparsePrefillParams& p);

// Argument checks (mla_validate.cpp): InvalidArgument naming the argument and values.
void validate(const MlaDecodeParams& p);
void validate(const MlaSparsePrefillParams& p);

}  // namespace ringattn::detail
