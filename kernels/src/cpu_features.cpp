#include "cpu_features.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
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

// CPUID leaf 7: AMX-BF16 (EDX bit 22), AMX-TILE (EDX bit 24); sub-leaf 1:
// AVX512_BF16 (EAX bit 5; the OS state of the zmm registers is the one
// __builtin_cpu_supports("avx512f") already checks).
bool cpuid7(unsigned sub, unsigned reg, unsigned bit) {
  unsigned r[4] = {0, 0, 0, 0};
  if (__get_cpuid_count(7, sub, &r[0], &r[1], &r[2], &r[3]) == 0) return false;
  return (r[reg] >> bit) & 1u;
}
bool has_amx_tile() { return cpuid7(0, 3, 24); }
bool has_amx_bf16() { return cpuid7(0, 3, 22); }
bool has_avx512_bf16() { return cpuid7(1, 0, 5); }

// The OS saves the tile state: XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA), read with
// xgetbv once CPUID reports OSXSAVE.
bool os_enables_tiles() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0 || (c & bit_OSXSAVE) == 0) return false;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & (3u << 17)) == (3u << 17);
}

// Linux (5.16+) hands the 8 KiB tile data state to a process only on request:
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). The permission is process
// wide; it is asked for once (a function-local static: thread-safe), and its outcome
// kept. Empty string = granted, otherwise the reason.
const std::string& amx_permission_error() {
  static const std::string err = []() -> std::string {
#if defined(__linux__) && defined(__x86_64__)
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
      return std::string("amx-permission (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA failed: ") +
             std::strerror(errno) + ")";
#endif
    return std::string();
  }();
  return err;
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
    case CpuIsa::kAmx:
      return "amx";
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
  const bool tiles = has_amx_tile() && has_amx_bf16();
  const Feature amx[] = {{"amx-tile", has_amx_tile()},
                         {"amx-bf16", has_amx_bf16()},
                         {"os-tile-state", !tiles || os_enables_tiles()}};
#else
  const Feature avx2[] = {{"avx2", false}, {"fma", false}, {"f16c", false}};
  const Feature avx512[] = {
      {"avx512f", false}, {"avx512bw", false}, {"avx512vl", false}, {"avx512dq", false}};
  const Feature bf16[] = {{"avx512_bf16", false}};
  const Feature amx[] = {{"amx-tile", false}, {"amx-bf16", false}};
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
  if (isa == CpuIsa::kAvx512 || isa == CpuIsa::kAvx512Bf16 || isa == CpuIsa::kAmx) add(avx512, 4);
  if (isa == CpuIsa::kAvx512Bf16 || isa == CpuIsa::kAmx) add(bf16, 1);
  if (isa == CpuIsa::kAmx) {
    add(amx, static_cast<int>(sizeof(amx) / sizeof(amx[0])));
#if defined(__x86_64__) || defined(__i386__)
    // Ask the OS only when the hardware is there (the request is process wide).
    if (miss.empty() && !amx_permission_error().empty()) miss = amx_permission_error();
#endif
  }
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
  if (cpu_supports(CpuIsa::kAmx)) return CpuIsa::kAmx;
  if (cpu_supports(CpuIsa::kAvx512Bf16)) return CpuIsa::kAvx512Bf16;
  if (cpu_supports(CpuIsa::kAvx512)) return CpuIsa::kAvx512;
  if (cpu_supports(CpuIsa::kAvx2)) return CpuIsa::kAvx2;
  return CpuIsa::kScalar;
}

bool cpu_has_avx512_vbmi() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi") != 0;
#else
  return false;
#endif
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
                         {"avx512_bf16", has_avx512_bf16()},
                         {"avx512vbmi", cpu_has_avx512_vbmi()},
                         {"amx-tile", has_amx_tile()},
                         {"amx-bf16", has_amx_bf16()}};
  for (const auto& f : all)
    if (f.present) {
      if (!s.empty()) s += ' ';
      s += f.name;
    }
#endif
  return s.empty() ? "none" : s;
}

}  // namespace ringattn::detail
