"""Package-level behaviour: several Python threads calling kernels at once (the GIL is
released while a kernel runs), thread and backend settings, the version string."""

import os
import subprocess
import threading

import numpy as np
import pytest

import ringattn
from ringattn import flash_attn_interface as fai

SEED = int(os.environ.get("RINGATTN_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
print(f"test_threads: RINGATTN_TEST_SEED={SEED}")


def _problem(rng, i):
    s_q, s_k = 37 + 11 * i, 90 + 7 * i
    q = rng.standard_normal((2, s_q, 4, 64)).astype(np.float32)
    k = rng.standard_normal((2, s_k, 2, 64)).astype(np.float32)
    v = rng.standard_normal((2, s_k, 2, 64)).astype(np.float32)
    return q, k, v


def test_concurrent_calls_match_serial():
    rng = np.random.default_rng(SEED)
    problems = [_problem(rng, i) for i in range(6)]
    serial = [fai.flash_attn_func(q, k, v, causal=bool(i % 2), return_attn_probs=True)
              for i, (q, k, v) in enumerate(problems)]
    results = [None] * len(problems)
    errors = []
    start = threading.Barrier(len(problems))

    def work(i):
        try:
            start.wait()
            q, k, v = problems[i]
            for _ in range(5):  # several rounds so that calls overlap
                results[i] = fai.flash_attn_func(q, k, v, causal=bool(i % 2), return_attn_probs=True)
        except Exception as e:  # reported below, with the thread's index
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, ((o, l), (so, sl)) in enumerate(zip(results, serial)):
        np.testing.assert_array_equal(o, so, err_msg=f"thread {i}: output")
        np.testing.assert_array_equal(l, sl, err_msg=f"thread {i}: lse")


def test_gil_released_while_kernel_runs():
    # A Python thread keeps counting while another thread is inside a long kernel call.
    rng = np.random.default_rng(SEED + 1)
    q = rng.standard_normal((1, 1024, 8, 128)).astype(np.float32)
    k = rng.standard_normal((1, 2048, 8, 128)).astype(np.float32)
    ticks = [0]
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1

    t = threading.Thread(target=count)
    t.start()
    before = ticks[0]
    fai.flash_attn_func(q, k, k)
    during = ticks[0] - before
    done.set()
    t.join()
    assert during > 0, "no Python thread ran during the kernel call: the GIL was held"


def test_threads_and_backend_settings():
    n = ringattn.get_num_threads()
    assert n >= 1
    ringattn.set_num_threads(1)
    assert ringattn.get_num_threads() == 1
    ringattn.set_num_threads(n)
    with pytest.raises(ValueError, match="n must be >= 1"):
        ringattn.set_num_threads(0)
    with pytest.raises(TypeError):
        ringattn.set_num_threads(1.5)
    name = ringattn.backend()
    assert name in ringattn.available_backends()
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ringattn.set_backend("gpu")
    assert ringattn.backend() == name  # a failed switch keeps the engine in use
    ringattn.set_backend("reference")
    assert ringattn.backend() == "reference"
    ringattn.set_backend("auto")
    assert ringattn.backend() == name


def test_version_matches_cli():
    cli = os.path.join(os.path.dirname(ringattn.__file__), "..", "..", "bin", "ringattn")
    if not os.path.exists(cli):
        pytest.skip(f"no ringattn CLI next to the package tree ({cli})")
    out = subprocess.run([cli, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == ringattn.__version__
