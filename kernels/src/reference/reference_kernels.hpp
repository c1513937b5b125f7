// Entry points of the reference backend (plain loops, always available; what the
// tests and the optimised backends compare against). Inputs are validated by Engine.
#pragma once

#include "ringattn/attention_params.hpp"

namespace ringattn::detail {

// Dense or varlen forward (docs/semantics.md sections 1-2). Writes p.out and p.lse.
void reference_forward(const FwdParams& p, int threads);

// KV-cache forward (docs/semantics.md section 3): appends k_new/v_new in place (with rotary),
// then attends. Honours p.plan / p.num_splits by computing the splits literally.
void reference_forward_kvcache(const KvCacheParams& p, int threads);

// Split plan: one split per sequence unless the caller asked for more (p.num_splits)
// or a sequence is long enough that splitting helps the thread count.
SchedulerMetadata reference_plan_kvcache(const KvCacheParams& p, int threads);

}  // namespace ringattn::detail
