// TEMPORARY placeholder: replaced by the real subcommand.
#include "cli/commands.hpp"
#include "ringattn/error.hpp"

namespace ringattn::cli {
int cmd_ring(int, char**) { RA_THROW(UnsupportedError, "ring: not built yet"); }
}  // namespace ringattn::cli
