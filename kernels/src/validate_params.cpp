// TEMPORARY placeholder: replaced by the full validation.
#include "backend.hpp"

namespace ringattn::detail {
void validate(const FwdParams&) {}
void validate(const KvCacheParams&) {}
}  // namespace ringattn::detail
