// Runtime CPU feature detection for backend selection.
#pragma once

#include <string>

namespace ringattn::detail {

// kAvx512Bf16: kAvx512 plus AVX512_BF16 (vdpbf16ps); kAmx: kAvx512Bf16 plus the AMX
// tile engine (amx-tile, amx-bf16). On both, bf16 storage runs the prefill products on
// that engine and everything else runs the kAvx512 code (cpu_backend.cpp).
enum class CpuIsa { kScalar, kAvx2, kAvx512, kAvx512Bf16, kAmx };

const char* isa_name(CpuIsa isa);

// True when this CPU (and OS) can run code built for `isa`; otherwise `missing`
// receives the names of the absent features, e.g. "avx512f avx512bw". For kAmx this
// includes the OS side: the tile state enabled in XCR0 and, on Linux, the process's
// permission to use it (arch_prctl ARCH_REQ_XCOMP_PERM, requested once per process,
// thread-safe); a refused request is reported as "amx-permission (...)".
bool cpu_supports(CpuIsa isa, std::string* missing = nullptr);

CpuIsa best_cpu_isa();

std::string cpu_feature_summary_impl();

// True on AMD CPUs: there the decode kernel reads an fp32 cache faster in key-major
// order (one ascending stream; Zen 5: 80-95 % of the read loop on 2 threads against
// 70-77 % head-major), while an Intel Xeon reads it faster head-major (93-97 %
// against 80-89 %). docs/cpu-backend.md, seventh round.
bool cpu_prefers_key_major_decode();

// AVX512_VBMI (byte permutes): the fp8 decode engine of the cpu-avx512-bf16 / cpu-amx
// tiers needs it (vpermi2b table lookups); every AVX512_BF16 CPU but Cooper Lake has it.
bool cpu_has_avx512_vbmi();

}  // namespace ringattn::detail
