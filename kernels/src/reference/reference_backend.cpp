// TEMPORARY placeholder: replaced by the reference backend.
#include "backend.hpp"
#include "mla/mla_kernels.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {
namespace {
class ReferenceBackend final : public Backend {
 public:
  std::string name() const override { return "reference"; }
  void forward(const FwdParams&, int) override { RA_THROW(UnsupportedError, "not yet"); }
  void forward_kvcache(const KvCacheParams&, int) override { RA_THROW(UnsupportedError, "not yet"); }
  SchedulerMetadata plan_kvcache(const KvCacheParams&, int) override { return {}; }
  void mla_decode(const MlaDecodeParams& p, int t) override { mla_decode_reference(p, t); }
};
}  // namespace
std::unique_ptr<Backend> make_reference_backend() { return std::make_unique<ReferenceBackend>(); }
}  // namespace ringattn::detail
