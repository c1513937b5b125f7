// TEMPORARY placeholder: replaced by the MLA implementation.
#include "mla/mla_kernels.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {
void mla_decode_reference(const MlaDecodeParams&, int) { RA_THROW(UnsupportedError, "mla: not built yet"); }
void mla_decode_cpu(const MlaDecodeParams&, CpuIsa, int) { RA_THROW(UnsupportedError, "mla: not built yet"); }
void validate(const MlaDecodeParams&) {}
}  // namespace ringattn::detail
