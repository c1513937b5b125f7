#include "cpu_features.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace ringattn::detail {

namespace {

#if defined(__x86_64__) || defined(__i386__)
// F16C from CPUID leaf 1 (ECX bit 29); not every compiler knows it as a
// __builtin_cpu_supports feature name.
bool has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_F16C) != 0;
}

// AVX512_BF16 from CPUID leaf 7 sub-leaf 1 (EAX bit 5). The OS state for the zmm
// registers is the one __builtin_cpu_supports("avx512f") already checks.
bool has_avx512_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 1, a, b, c, d);
  return (a & (1u << 5)) != 0;
}
#endif

struct Feature {
  const char* name;
  bool present;
};
}  // namespace

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar:
      return "scalar";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx512Bf16:
      return "avx512-bf16";
  }
  return "?";
}

bool cpu_supports(CpuIsa isa, std::string* missing) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const Feature avx2[] = {{"avx2", __builtin_cpu_supports("avx2") != 0},
                          {"fma", __builtin_cpu_supports("fma") != 0},
                          {"f16c", has_f16c()}};
  const Feature avx512[] = {{"avx512f", __builtin_cpu_supports("avx512f") != 0},
                            {"avx512bw", __builtin_cpu_supports("avx512bw") != 0},
                            {"avx512vl", __builtin_cpu_supports("avx512vl") != 0},
                            {"avx512dq", __builtin_cpu_supports("avx512dq") != 0}};
  const Feature bf16[] = {{"avx512_bf16", has_avx512_bf16()}};
#else
  const Feature avx2[] = {{"avx2", false}, {"fma", false}, {"f16c", false}};
  const Feature avx512[] = {
      {"avx512f", false}, {"avx512bw", false}, {"avx512vl", false}, {"avx512dq", false}};
  const Feature bf16[] = {{"avx512_bf16", false}};
#endif
  std::string miss;
  auto add = [&](const Feature* f, int n) {
    for (int i = 0; i < n; ++i)
      if (!f[i].present) {
        if (!miss.empty()) miss += ' ';
        miss += f[i].name;
      }
  };
  if (isa != CpuIsa::kScalar) add(avx2, 3);
  if (isa == CpuIsa::kAvx512 || isa == CpuIsa::kAvx512Bf16) add(avx512, 4);
  if (isa == CpuIsa::kAvx512Bf16) add(bf16, 1);
  if (missing) *missing = miss;
  return miss.empty();
}

bool cpu_prefers_key_major_decode() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d) == 0) return false;
  // Vendor string in EBX, EDX, ECX: "AuthenticAMD".
  return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;
#else
  return false;
#endif
}

CpuIsa best_cpu_isa() {
  if (cpu_supports(CpuIsa::kAvx512Bf16)) return CpuIsa::kAvx512Bf16;
  if (cpu_supports(CpuIsa::kAvx512)) return CpuIsa::kAvx512;
  if (cpu_supports(CpuIsa::kAvx2)) return CpuIsa::kAvx2;
  return CpuIsa::kScalar;
}

std::string cpu_feature_summary_impl() {
  std::string s;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const Feature all[] = {{"avx2", __builtin_cpu_supports("avx2") != 0},
                         {"fma", __builtin_cpu_supports("fma") != 0},
                         {"f16c", has_f16c()},
                         {"avx512f", __builtin_cpu_supports("avx512f") != 0},
                         {"avx512bw", __builtin_cpu_supports("avx512bw") != 0},
                         {"avx512vl", __builtin_cpu_supports("avx512vl") != 0},
                         {"avx512dq", __builtin_cpu_supports("avx512dq") != 0},
                         {"avx512_bf16", has_avx512_bf16()}};
  for (const auto& f : all)
    if (f.present) {
      if (!s.empty()) s += ' ';
      s += f.name;
    }
#endif
  return s.empty() ? "none" : s;
}

}  // namespace ringattn::detail
