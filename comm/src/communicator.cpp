#include "ringattn/comm/communicator.hpp"

#include <cstdlib>
#include <exception>

#include "ringattn/comm/mpi_check.hpp"

namespace ringattn::comm {
namespace {

void finalize_at_exit() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv, int required) {
  int initialized = 0;
  RA_MPI_CHECK(MPI_Initialized(&initialized));
  if (initialized) {
    RA_MPI_CHECK(MPI_Query_thread(&provided_));
  } else {
    RA_MPI_CHECK(MPI_Init_thread(argc, argv, required, &provided_));
    owns_ = true;
  }
  RA_CHECK(provided_ >= required, UnsupportedError,
           "MPI: thread support level " << provided_ << " is below the required " << required);
}

// Leaving by an exception, MPI_Finalize is deferred to exit: the CLI prints the error
// first. For an error the ranks agreed on (collectives.hpp, agree_on_error) every rank
// prints it and then meets the others in MPI_Finalize, so no rank exits (which makes
// mpirun kill the rest) before all have printed.
MpiRuntime::~MpiRuntime() {
  if (!owns_) return;
  if (std::uncaught_exceptions() > 0 && std::atexit(finalize_at_exit) == 0) return;
  finalize_at_exit();
}

Communicator::Communicator(MPI_Comm parent) {
  RA_CHECK_ARG(parent != MPI_COMM_NULL, "comm: MPI_COMM_NULL given");
  RA_MPI_CHECK(MPI_Comm_dup(parent, &comm_));
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  RA_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  RA_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

Communicator::Communicator(const Communicator& parent, int color, int key) {
  RA_CHECK_ARG(color >= 0, "comm split: color must be >= 0, got " << color);
  RA_MPI_CHECK(MPI_Comm_split(parent.get(), color, key, &comm_));
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  RA_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  RA_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

Communicator::~Communicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void Communicator::barrier() const { RA_MPI_CHECK(MPI_Barrier(comm_)); }

}  // namespace ringattn::comm
