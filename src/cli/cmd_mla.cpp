// TEMPORARY placeholder: replaced by the real subcommand.
#include "cli/commands.hpp"
#include "ringattn/error.hpp"

namespace ringattn::cli {
int cmd_mla(int, char**) { RA_THROW(UnsupportedError, "mla: not built yet"); }
}  // namespace ringattn::cli
