// TEMPORARY placeholder: replaced by the real subcommand.
#include "cli/commands.hpp"
#include "ringattn/error.hpp"

namespace ringattn::cli {
int cmd_kvcache(int, char**) { RA_THROW(UnsupportedError, "kvcache: not built yet"); }
}  // namespace ringattn::cli
