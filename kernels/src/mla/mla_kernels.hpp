// MLA kernels behind the backends (internal). Backends route Engine::mla_decode here.
#pragma once

#include "cpu_features.hpp"
#include "ringattn/mla_params.hpp"

namespace ringattn::detail {

// Plain loops; what the tests compare against.
void mla_decode_reference(const MlaDecodeParams& p, int threads);

// Optimised CPU path for the given ISA.
void mla_decode_cpu(const MlaDecodeParams& p, CpuIsa isa, int threads);

}  // namespace ringattn::detail
