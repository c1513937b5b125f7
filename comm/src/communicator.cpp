#include "ringattn/comm/communicator.hpp"

#include "ringattn/comm/mpi_check.hpp"

namespace ringattn::comm {

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

MpiRuntime::~MpiRuntime() {
  if (!owns_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

Communicator::Communicator(MPI_Comm parent) {
  RA_CHECK_ARG(parent != MPI_COMM_NULL, "comm: MPI_COMM_NULL given");
  RA_MPI_CHECK(MPI_Comm_dup(parent, &comm_));
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
