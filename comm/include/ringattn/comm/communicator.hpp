// RAII over MPI: the process-wide runtime (MPI_Init_thread / MPI_Finalize) and a
// communicator object that owns a private duplicate of a caller-given MPI_Comm, so
// ringattn's messages can never match a user's receive. Library code never names
// MPI_COMM_WORLD; the caller decides which ranks take part.
#pragma once

#include <mpi.h>

namespace ringattn::comm {

// Initialises MPI once for the process (if nobody has yet) with at least
// `required` thread support, and finalises it on destruction when this object did
// the initialisation. ringattn needs MPI_THREAD_FUNNELED: only the thread that
// called ring/decode functions talks to MPI; OpenMP workers never do.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv, int required = MPI_THREAD_FUNNELED);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  int provided() const { return provided_; }

 private:
  bool owns_ = false;
  int provided_ = MPI_THREAD_SINGLE;
};

// A private duplicate of `parent` (MPI_Comm_dup), freed on destruction. Errors on
// it are returned (MPI_ERRORS_RETURN) and turned into CommError by RA_MPI_CHECK.
class Communicator {
 public:
  explicit Communicator(MPI_Comm parent);
  // Collective over `parent`: the sub-communicator of the ranks that pass the same
  // `color` (MPI_Comm_split), ranked by `key` (ties by parent rank). Grids of ranks
  // (ulysses_attention.hpp) are built from two of these.
  Communicator(const Communicator& parent, int color, int key);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  MPI_Comm get() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  // Ring neighbours: data flows from left() to rank() to right().
  int left() const { return (rank_ - 1 + size_) % size_; }
  int right() const { return (rank_ + 1) % size_; }

  void barrier() const;

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace ringattn::comm
