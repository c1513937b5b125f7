// Internal backend interface. Engine validates params, then calls exactly one
// Backend chosen at construction. Backends may assume validated inputs.
#pragma once

#include <memory>
#include <string>

#include "cpu_features.hpp"
#include "ringattn/attention_params.hpp"

namespace ringattn {
struct MlaDecodeParams;
struct MlaSparsePrefillParams;
}  // namespace ringattn

namespace ringattn::detail {

// fp32 decode tile order of the CPU backend (EngineOptions::decode_order).
enum class DecodeOrder { kAuto, kKeyMajor, kHeadMajor };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // "key-major" / "head-major" (CPU backend), "none" (reference).
  virtual std::string decode_order() const { return "none"; }
  // `threads` >= 1: OpenMP threads this call may use.
  virtual void forward(const FwdParams& p, int threads) = 0;
  virtual void forward_kvcache(const KvCacheParams& p, int threads) = 0;
  virtual SchedulerMetadata plan_kvcache(const KvCacheParams& p, int threads) = 0;
  virtual void mla_decode(const MlaDecodeParams& p, int threads) = 0;
  virtual void mla_sparse_prefill(const MlaSparsePrefillParams& p, int threads) = 0;
};

// reference/reference_backend.cpp
std::unique_ptr<Backend> make_reference_backend();
// cpu/cpu_backend.cpp; precondition: cpu_supports(isa). kAuto resolves by
// cpu_prefers_key_major_decode().
std::unique_ptr<Backend> make_cpu_backend(CpuIsa isa, DecodeOrder order);

// validate_params.cpp: throw InvalidArgument naming the argument and the values.
void validate(const FwdParams& p);
void validate(const KvCacheParams& p);
void validate(const MlaDecodeParams& p);

}  // namespace ringattn::detail
