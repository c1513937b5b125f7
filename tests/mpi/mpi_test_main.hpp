// Shared main of the MPI gtest binaries (mpi_test_main.cpp): MPI runtime, one duplicate of
// MPI_COMM_WORLD for the tests, results printed by rank 0 only, and an exit code that is
// non-zero on every rank when a test failed on any rank.
#pragma once

#include "ringattn/comm/communicator.hpp"

namespace ringattn::test {

// The communicator every test of the binary runs on (all ranks of mpirun).
const comm::Communicator& world();

}  // namespace ringattn::test
