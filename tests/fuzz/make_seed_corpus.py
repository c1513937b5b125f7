#!/usr/bin/python3
"""Regenerates the checked-in seed corpora under corpus/<target>/ (deterministic)."""
import io
import os
import random
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def npy_bytes(arr, version=(1, 0), descr=None, fortran=False, shape=None, extra=b""):
    descr = descr or np.lib.format.dtype_to_descr(arr.dtype)
    shape = arr.shape if shape is None else shape
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (
        descr, "True" if fortran else "False", repr(tuple(shape)))
    hb = header.encode("latin1")
    size_fmt = "<H" if version[0] == 1 else "<I"
    pre = 10 if version[0] == 1 else 12
    pad = (64 - (pre + len(hb) + 1) % 64) % 64
    hb = hb + b" " * pad + b"\n"
    return (b"\x93NUMPY" + bytes(version) + struct.pack(size_fmt, len(hb)) + hb +
            arr.tobytes() + extra)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def npy_seeds():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3)).astype("<f4")
    write("fuzz_npy", "f4_2x3", npy_bytes(a))
    write("fuzz_npy", "f2_4", npy_bytes(rng.standard_normal(4).astype("<f2")))
    write("fuzz_npy", "i4_cu", npy_bytes(np.array([0, 3, 3, 7], dtype="<i4")))
    write("fuzz_npy", "i8_2x2", npy_bytes(np.array([[1, -1], [2**40, 5]], dtype="<i8")))
    write("fuzz_npy", "scalar_f4", npy_bytes(np.array(1.5, dtype="<f4")))
    write("fuzz_npy", "empty_0x4", npy_bytes(np.zeros((0, 4), dtype="<f4")))
    write("fuzz_npy", "v2_f4", npy_bytes(a, version=(2, 0)))
    write("fuzz_npy", "v3_f4", npy_bytes(a, version=(3, 0)))
    buf = io.BytesIO()
    np.save(buf, rng.standard_normal((1, 2, 2, 8)).astype("<f4"))
    write("fuzz_npy", "numpy_saved_4d", buf.getvalue())
    # Malformed ones, each a different reason to fail.
    write("fuzz_npy", "bad_fortran", npy_bytes(a, fortran=True))
    write("fuzz_npy", "bad_f8", npy_bytes(a.astype("<f8")))
    write("fuzz_npy", "bad_big_endian", npy_bytes(a.astype(">f4")))
    write("fuzz_npy", "bad_u1", npy_bytes(np.arange(6, dtype="u1")))
    write("fuzz_npy", "bad_huge_shape", npy_bytes(a, shape=(1 << 40, 1 << 20)))
    write("fuzz_npy", "bad_overflow_shape", npy_bytes(a, shape=(1 << 62, 1 << 62, 16)))
    write("fuzz_npy", "bad_negative_shape", npy_bytes(a, shape=(-2, 3)))
    write("fuzz_npy", "bad_header_lies", npy_bytes(a, shape=(3, 3)))
    write("fuzz_npy", "bad_trailing", npy_bytes(a, extra=b"\0\0\0\0"))
    write("fuzz_npy", "bad_truncated_data", npy_bytes(a)[:-5])
    write("fuzz_npy", "bad_truncated_header", npy_bytes(a)[:30])
    write("fuzz_npy", "bad_magic", b"\x93NUMPX" + npy_bytes(a)[6:])
    write("fuzz_npy", "bad_version", npy_bytes(a, version=(9, 0)))
    write("fuzz_npy", "empty_file", b"")


def kernel_seeds():
    rng = random.Random(1)
    for op in range(5):  # first byte selects dense, varlen, kvcache, mla, merge
        for i in range(6):
            body = bytes(rng.randrange(256) for _ in range(rng.choice([16, 48, 160])))
            write("fuzz_kernels", "op%d_%d" % (op, i), bytes([op]) + body)
        write("fuzz_kernels", "op%d_zero" % op, bytes([op]) + bytes(64))


if __name__ == "__main__":
    npy_seeds()
    kernel_seeds()
