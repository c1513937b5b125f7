// Engine: the single entry point of the kernel layer. The backend is chosen once,
// when the engine is created:
//   "auto"        best backend this CPU supports (cpu-avx512 > cpu-avx2 > cpu-scalar)
//   "reference"   plain loops, always available; what the tests compare against
//   "cpu"         optimised CPU path with the best SIMD ISA this CPU supports
//   "cpu-avx512" | "cpu-avx2" | "cpu-scalar"   that ISA explicitly; asking for one the
//                 CPU cannot run throws UnsupportedError naming the missing feature.
// Every call validates its params (InvalidArgument naming the argument and values)
// before the backend runs. Engines are cheap to keep and safe to share between
// threads for concurrent calls on different outputs. A CPU engine keeps up to 4 of
// its large per-call buffers (packed K/V tiles, split-KV partials) for later calls,
// so repeated calls do not page-fault fresh memory; they are freed with the engine.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "ringattn/attention_params.hpp"

namespace ringattn {

struct MlaDecodeParams;         // ringattn/mla_params.hpp
struct MlaSparsePrefillParams;  // ringattn/mla_params.hpp

namespace detail {
class Backend;
}

struct EngineOptions {
  std::string backend = "auto";
  int threads = 0;  // OpenMP threads per call; 0 = omp_get_max_threads()
  // Order in which the CPU decode kernel reads an fp32 KV cache (speed only, results
  // are the same): "key-major" (all KV heads of one key, then the next key: K and V
  // each one ascending stream), "head-major" (a tile's keys of one head, then the next
  // head; accumulators in registers), or "auto": key-major on AMD CPUs, head-major on
  // others (docs/cpu-backend.md has the measurements behind the rule).
  std::string decode_order = "auto";
};

class Engine {
 public:
  explicit Engine(const EngineOptions& options = {});
  ~Engine();
  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Name of the backend actually selected (e.g. "cpu-avx2" for "auto").
  const std::string& backend_name() const { return name_; }
  int threads() const { return threads_; }
  // fp32 decode order in use: "key-major" or "head-major" ("none" for reference).
  const std::string& decode_order() const { return decode_order_; }

  // Dense or varlen forward (docs/semantics.md sections 1-2). Writes p.out and p.lse.
  void forward(const FwdParams& p) const;

  // KV-cache forward (docs/semantics.md section 3). Appends k_new/v_new into the caches in
  // place, then writes p.out and p.lse.
  void forward_kvcache(const KvCacheParams& p) const;

  // Scheduler plan for a KV-cache call with these shapes (FA3 get_scheduler_metadata).
  // Pass it back through p.plan; it changes speed only.
  SchedulerMetadata plan_kvcache(const KvCacheParams& p) const;

  // DeepSeek MLA decode (docs/semantics.md section 4).
  void mla_decode(const MlaDecodeParams& p) const;

  // Split-KV plan for an MLA decode with these shapes (FlashMLA get_mla_metadata).
  // Pass it back through p.plan; it changes speed only.
  SchedulerMetadata plan_mla_decode(const MlaDecodeParams& p) const;

  // Sparse MLA prefill (docs/semantics.md section 4); picks its path by the rule documented
  // in mla_params.hpp unless p.path says otherwise.
  void mla_sparse_prefill(const MlaSparsePrefillParams& p) const;

 private:
  std::unique_ptr<detail::Backend> backend_;
  std::string name_;
  std::string decode_order_;
  int threads_ = 1;
};

// Backend names this machine can run, best first (always ends with "reference").
std::vector<std::string> available_backends();

// Human description of the CPU features detected (e.g. "avx2 fma f16c").
std::string cpu_feature_summary();

}  // namespace ringattn
