#include "ringattn/engine.hpp"

#include <omp.h>

#include "backend.hpp"
#include "mla/mla_kernels.hpp"
#include "ringattn/error.hpp"

namespace ringattn {

namespace {

using detail::CpuIsa;

// The one selection point: backend name -> Backend object.
std::unique_ptr<detail::Backend> select_backend(const std::string& name,
                                                detail::DecodeOrder order) {
  if (name == "reference") return detail::make_reference_backend();
  if (name == "auto" || name == "cpu")
    return detail::make_cpu_backend(detail::best_cpu_isa(), order);
  CpuIsa isa;
  if (name == "cpu-amx") {
    isa = CpuIsa::kAmx;
  } else if (name == "cpu-avx512-bf16") {
    isa = CpuIsa::kAvx512Bf16;
  } else if (name == "cpu-avx512") {
    isa = CpuIsa::kAvx512;
  } else if (name == "cpu-avx2") {
    isa = CpuIsa::kAvx2;
  } else if (name == "cpu-scalar") {
    isa = CpuIsa::kScalar;
  } else {
    RA_THROW(InvalidArgument, "backend: unknown backend '"
                                  << name
                                  << "' (expected auto, cpu, cpu-amx, cpu-avx512-bf16, "
                                     "cpu-avx512, cpu-avx2, cpu-scalar or reference)");
  }
  std::string missing;
  RA_CHECK(detail::cpu_supports(isa, &missing), UnsupportedError,
           "backend: '" << name << "' needs CPU features this machine lacks: " << missing
                        << " (available: " << cpu_feature_summary() << ")");
  return detail::make_cpu_backend(isa, order);
}

detail::DecodeOrder parse_decode_order(const std::string& s) {
  if (s == "auto") return detail::DecodeOrder::kAuto;
  if (s == "key-major") return detail::DecodeOrder::kKeyMajor;
  if (s == "head-major") return detail::DecodeOrder::kHeadMajor;
  RA_THROW(InvalidArgument,
           "decode_order: unknown order '" << s << "' (expected auto, key-major or head-major)");
}

}  // namespace

Engine::Engine(const EngineOptions& options) {
  RA_CHECK_ARG_GE(options.threads, 0, "threads: must be >= 0 (0 = all)");
  backend_ = select_backend(options.backend, parse_decode_order(options.decode_order));
  name_ = backend_->name();
  decode_order_ = backend_->decode_order();
  threads_ = options.threads > 0 ? options.threads : omp_get_max_threads();
  if (threads_ < 1) threads_ = 1;
}

Engine::~Engine() = default;
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;

void Engine::forward(const FwdParams& p) const {
  detail::validate(p);
  backend_->forward(p, threads_);
}

void Engine::forward_kvcache(const KvCacheParams& p) const {
  detail::validate(p);
  backend_->forward_kvcache(p, threads_);
}

SchedulerMetadata Engine::plan_kvcache(const KvCacheParams& p) const {
  detail::validate(p);
  return backend_->plan_kvcache(p, threads_);
}

void Engine::mla_decode(const MlaDecodeParams& p) const {
  detail::validate(p);
  backend_->mla_decode(p, threads_);
}

SchedulerMetadata Engine::plan_mla_decode(const MlaDecodeParams& p) const {
  detail::validate(p);
  return detail::mla_plan_decode(p, threads_);
}

void Engine::mla_sparse_prefill(const MlaSparsePrefillParams& p) const {
  detail::validate(p);
  backend_->mla_sparse_prefill(p, threads_);
}

std::vector<std::string> available_backends() {
  std::vector<std::string> names;
  if (detail::cpu_supports(CpuIsa::kAmx)) names.push_back("cpu-amx");
  if (detail::cpu_supports(CpuIsa::kAvx512Bf16)) names.push_back("cpu-avx512-bf16");
  if (detail::cpu_supports(CpuIsa::kAvx512)) names.push_back("cpu-avx512");
  if (detail::cpu_supports(CpuIsa::kAvx2)) names.push_back("cpu-avx2");
  names.push_back("cpu-scalar");
  names.push_back("reference");
  return names;
}

std::string cpu_feature_summary() { return detail::cpu_feature_summary_impl(); }

}  // namespace ringattn
