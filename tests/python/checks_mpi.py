"""Bookkeeping shared by the MPI driver scripts (mpi_*.py): every rank records its checks,
and summary() gathers the counts, prints one line on rank 0 and gives the exit status
(non-zero when any rank failed a check)."""
import numpy as np
from mpi4py import MPI

try:
    import torch
except ImportError:  # numpy only
    torch = None

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
_FAILURES = []
_CHECKS = [0]


def check(cond, what):
    _CHECKS[0] += 1
    if not cond:
        _FAILURES.append(what)
        print(f"[rank {RANK}] FAIL: {what}", flush=True)


def f64(x):
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def summary(name, extra=""):
    """`name: P ranks, C checks, F failed<extra>` on rank 0; returns 1 if any check failed."""
    counts = COMM.allgather((_CHECKS[0], len(_FAILURES)))
    failed = sum(f for _, f in counts)
    if RANK == 0:
        print(f"{name}: {SIZE} ranks, {sum(c for c, _ in counts)} checks, {failed} failed{extra}",
              flush=True)
    return 1 if failed else 0
