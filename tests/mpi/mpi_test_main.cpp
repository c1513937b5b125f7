#include "mpi_test_main.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

namespace ringattn::test {
namespace {
const comm::Communicator* g_world = nullptr;
}  // namespace

const comm::Communicator& world() { return *g_world; }

}  // namespace ringattn::test

int main(int argc, char** argv) {
  ringattn::comm::MpiRuntime runtime(&argc, &argv);
  int rc = 0;
  {
    ringattn::comm::Communicator comm(MPI_COMM_WORLD);
    ringattn::test::g_world = &comm;
    ::testing::InitGoogleTest(&argc, argv);
    if (comm.rank() != 0) {
      auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
    }
    rc = RUN_ALL_TESTS();
    int any = 0;
    MPI_Allreduce(&rc, &any, 1, MPI_INT, MPI_MAX, comm.get());
    rc = any;
  }
  return rc;
}
