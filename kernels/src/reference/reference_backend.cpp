// The reference backend: plain loops over every entry point, always available.
// Tests and the optimised backends compare against it.
#include "backend.hpp"
#include "mla/mla_kernels.hpp"
#include "reference/reference_kernels.hpp"

namespace ringattn::detail {
namespace {

class ReferenceBackend final : public Backend {
 public:
  std::string name() const override { return "reference"; }
  void forward(const FwdParams& p, int threads) override { reference_forward(p, threads); }
  void forward_kvcache(const KvCacheParams& p, int threads) override {
    reference_forward_kvcache(p, threads);
  }
  SchedulerMetadata plan_kvcache(const KvCacheParams& p, int threads) override {
    return reference_plan_kvcache(p, threads);
  }
  void mla_sparse_prefill(const MlaSparsePrefillParams& p, int threads) override {
    mla_sparse_prefill_reference(p, threads);
  }
  void mla_decode(const MlaDecodeParams& p, int threads) override {
    mla_decode_reference(p, threads);
  }
};

}  // namespace

std::unique_ptr<Backend> make_reference_backend() { return std::make_unique<ReferenceBackend>(); }

}  // namespace ringattn::detail
