// ringattn: command-line entry point. Dispatches to one subcommand; see docs/cli.md
// for the contract of each.
#include <boost/program_options/errors.hpp>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string_view>

#include "cli/commands.hpp"
#include "ringattn/error.hpp"
#include "ringattn/version.hpp"

namespace {

struct Subcommand {
  const char* name;
  int (*run)(int, char**);
  const char* summary;
};

constexpr Subcommand kSubcommands[] = {
    {"attn", ringattn::cli::cmd_attn, "dense / varlen attention on .npy inputs"},
    {"kvcache", ringattn::cli::cmd_kvcache, "attention against a (paged) KV cache, with append"},
    {"mla", ringattn::cli::cmd_mla, "DeepSeek MLA decode on a paged latent cache"},
    {"ring", ringattn::cli::cmd_ring, "ring attention across MPI ranks (run under mpirun)"},
    {"decode", ringattn::cli::cmd_decode, "distributed decode over a sharded KV cache (mpirun)"},
    {"session", ringattn::cli::cmd_session,
     "prefill, decode and extend over a KV cache sharded across ranks (mpirun)"},
    {"bench", ringattn::cli::cmd_bench, "kernel benchmarks against this machine's measured peak"},
};

void print_usage(std::FILE* f) {
  std::fprintf(f, "usage: ringattn <subcommand> [options]   (ringattn <subcommand> --help)\n\n");
  for (const auto& s : kSubcommands) std::fprintf(f, "  %-8s %s\n", s.name, s.summary);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(stderr);
    return 2;
  }
  const std::string_view first = argv[1];
  if (first == "--help" || first == "-h" || first == "help") {
    print_usage(stdout);
    return 0;
  }
  if (first == "--version") {
    std::printf("ringattn %s\n", ringattn::version());
    return 0;
  }
  for (const auto& s : kSubcommands) {
    if (first != s.name) continue;
    try {
      return s.run(argc - 1, argv + 1);
    } catch (const boost::program_options::error& e) {
      std::fprintf(stderr, "ringattn %s: error: %s\n", s.name, e.what());
      return 2;
    } catch (const ringattn::InvalidArgument& e) {
      std::fprintf(stderr, "ringattn %s: error: %s\n", s.name, e.what());
      return 2;
    } catch (const std::bad_alloc&) {
      // Allocation failure is reported as what it is, never as a crash.
      std::fprintf(stderr, "ringattn %s: error: out of memory (an allocation failed)\n", s.name);
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "ringattn %s: error: %s\n", s.name, e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "ringattn: unknown subcommand '%s'\n\n", argv[1]);
  print_usage(stderr);
  return 2;
}
