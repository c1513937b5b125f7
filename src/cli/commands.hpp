// Subcommands of the `ringattn` tool. Each takes the arguments after the program
// name (argv[0] is the subcommand) and returns the process exit code; errors are
// thrown as ringattn::Error (or boost::program_options::error) and turned into a
// message and exit code by main.cpp:
//   0 success, 1 runtime failure (I/O, MPI, unsupported), 2 bad usage / bad input.
#pragma once

namespace ringattn::cli {

int cmd_attn(int argc, char** argv);     // cmd_attn.cpp
int cmd_kvcache(int argc, char** argv);  // cmd_kvcache.cpp
int cmd_mla(int argc, char** argv);      // cmd_mla.cpp
int cmd_ring(int argc, char** argv);     // cmd_ring.cpp    (under mpirun)
int cmd_decode(int argc, char** argv);   // cmd_decode.cpp  (under mpirun)
int cmd_session(int argc, char** argv);  // cmd_session.cpp (under mpirun)
int cmd_bench(int argc, char** argv);    // cmd_bench.cpp

}  // namespace ringattn::cli
