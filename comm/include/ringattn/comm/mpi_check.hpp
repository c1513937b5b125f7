// The one MPI error check: every MPI call in ringattn goes through RA_MPI_CHECK,
// which turns a non-success code into ringattn::CommError carrying the MPI error
// string, the call text and file:line.
#pragma once

#include <mpi.h>

#include <string>

#include "ringattn/error.hpp"

namespace ringattn::comm {

// "MPI_ERR_TRUNCATE: message truncated" style text for an MPI error code.
std::string mpi_error_string(int code);

}  // namespace ringattn::comm

#define RA_MPI_CHECK(call)                                                                         \
  do {                                                                                             \
    const int ra_mpi_rc_ = (call);                                                                 \
    if (ra_mpi_rc_ != MPI_SUCCESS)                                                                 \
      RA_THROW(CommError, #call << " failed: " << ::ringattn::comm::mpi_error_string(ra_mpi_rc_)); \
  } while (0)
