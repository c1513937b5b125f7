"""fp8 e4m3 q/k/v with q_descale / k_descale / v_descale (FA3) through
ringattn.flash_attn_interface, against a float64 NumPy reference that decodes the e4m3
bytes exactly and multiplies by the [b, h_k] descales (docs/semantics.md "fp8 e4m3 q/k/v").

Runs on every torch: uint8 tensors holding e4m3 bits (torch 1.13 has no fp8 dtype) and
numpy uint8 always, torch.float8_e4m3fn where the installed torch has it. Replay a
failure with RINGATTN_TEST_SEED=<seed>."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ringattn  # noqa: E402
from ringattn import flash_attn_interface as fai  # noqa: E402
from test_flash_attn_interface import SEED, ref_attention, rng_for  # noqa: E402

HAS_FP8 = hasattr(torch, "float8_e4m3fn")
# (tensor kind, element type): uint8 bits in torch and numpy, and the real fp8 dtype.
KINDS = [("torch", "u8"), ("numpy", "u8")] + ([("torch", "fp8")] if HAS_FP8 else [])


def e4m3_table():
    """float64 value of each of the 256 e4m3fn bytes (0x7f / 0xff: NaN)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1.0 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = sign * val
    val[(b & 0x7F) == 0x7F] = np.nan
    return val


E4M3 = e4m3_table()


def random_bytes(rng, shape):
    """e4m3 bytes of magnitude about 2^-4 .. 2^3, a few subnormals and zeros, no NaN."""
    exp = rng.integers(3, 11, size=shape)
    exp = np.where(rng.random(shape) < 0.05, 0, exp)  # subnormals and zeros
    b = (rng.integers(0, 2, size=shape) << 7) | (exp << 3) | rng.integers(0, 8, size=shape)
    return b.astype(np.uint8)


def as_kind(bytes_, kind, typ):
    """Bytes as the tensor kind / element type under test (no conversion of the bits)."""
    if kind == "numpy":
        return bytes_
    t = torch.from_numpy(bytes_.copy())
    return t.view(torch.float8_e4m3fn) if typ == "fp8" else t


def as_f64(x):
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return x.to(torch.float64).numpy()


def descales(rng, b, h_k, kind):
    d = rng.uniform(0.25, 2.0, size=(b, h_k)).astype(np.float32)
    return d, (d if kind == "numpy" else torch.from_numpy(d))


def p_rounding_atol(v_max):
    """Extra bar of the tier whose fp8 decode rounds P to bf16 as FA3 does (cpu-avx512-bf16;
    cpu-amx runs fp8 in fp32): 2^-8 max|v|, v dequantised (docs/semantics.md section 6)."""
    return 2.0**-8 * v_max if ringattn.backend() == "cpu-avx512-bf16" else 0.0


def check(got, want, what, out_bf16, extra_atol=0.0):
    """pt-style bound: bf16 output rounding (2^-8 relative) or fp32 accumulation."""
    got = as_f64(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape} (seed {SEED})"
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), f"{what}: -inf pattern (seed {SEED})"
    fin = np.isfinite(want)
    if not fin.any():
        return
    assert not np.isnan(got).any(), f"{what}: NaN (seed {SEED})"
    mag = max(1.0, np.abs(want[fin]).max())
    tol = mag * (2.0**-7 if out_bf16 else 3e-5) + extra_atol
    err = np.abs(got[fin] - want[fin]).max()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} (seed {SEED})"


def expected_out_dtype(kind):
    return np.float32 if kind == "numpy" else torch.bfloat16


@pytest.mark.parametrize("kind,typ", KINDS)
def test_dense_and_varlen_against_reference(kind, typ):
    rng = rng_for("fp8-dense", kind, typ)
    for trial in range(6):
        b = int(rng.integers(1, 4))
        h, h_k = [(6, 2), (4, 1), (4, 4), (8, 2)][trial % 4]
        d, d_v = [(64, 64), (32, 16), (128, 128), (40, 24)][int(rng.integers(4))]
        s_q, s_k = [(1, 300), (7, 20), (33, 33), (5, 1)][int(rng.integers(4))]
        causal = bool(rng.integers(2))
        window = (int(rng.integers(-1, 9)), -1) if rng.integers(3) == 0 else (-1, -1)
        softcap = float(rng.choice([0.0, 10.0]))
        qb, kb, vb = (random_bytes(rng, s) for s in ((b, s_q, h, d), (b, s_k, h_k, d), (b, s_k, h_k, d_v)))
        qd, qdt = descales(rng, b, h_k, kind)
        kd, kdt = descales(rng, b, h_k, kind)
        vd, vdt = descales(rng, b, h_k, kind)
        what = f"dense trial {trial} b={b} h={h}/{h_k} d={d}/{d_v} s={s_q}/{s_k} causal={causal}"
        out, lse = fai.flash_attn_func(as_kind(qb, kind, typ), as_kind(kb, kind, typ), as_kind(vb, kind, typ),
                                       causal=causal, window_size=window, softcap=softcap,
                                       q_descale=qdt, k_descale=kdt, v_descale=vdt,
                                       return_attn_probs=True)
        assert out.dtype == expected_out_dtype(kind), what
        g = h // h_k
        for bi in range(b):
            q = E4M3[qb[bi]] * np.repeat(qd[bi], g)[None, :, None]
            k = E4M3[kb[bi]] * kd[bi][None, :, None]
            v = E4M3[vb[bi]] * vd[bi][None, :, None]
            ro, rl = ref_attention(q, k, v, causal=causal, window=window, softcap=softcap)
            check(out[bi], ro, what + " out", kind != "numpy", p_rounding_atol(np.abs(v).max()))
            check(lse[bi], rl, what + " lse", False)

    # Varlen: segments of their own lengths, the same descales per segment.
    lens_q, lens_k = [3, 0, 9], [12, 5, 1]
    h, h_k, d = 6, 2, 32
    cq = np.cumsum([0] + lens_q).astype(np.int32)
    ck = np.cumsum([0] + lens_k).astype(np.int32)
    qb, kb, vb = (random_bytes(rng, (n, hh, d)) for n, hh in ((cq[-1], h), (ck[-1], h_k), (ck[-1], h_k)))
    qd, qdt = descales(rng, 3, h_k, kind)
    kd, kdt = descales(rng, 3, h_k, kind)
    vd, vdt = descales(rng, 3, h_k, kind)
    if kind == "torch":
        cqa, cka = torch.from_numpy(cq), torch.from_numpy(ck)
    else:
        cqa, cka = cq, ck
    out, lse = fai.flash_attn_varlen_func(as_kind(qb, kind, typ), as_kind(kb, kind, typ), as_kind(vb, kind, typ),
                                          cqa, cka, None, None, causal=True, q_descale=qdt,
                                          k_descale=kdt, v_descale=vdt, return_attn_probs=True)
    assert out.dtype == expected_out_dtype(kind)
    for i in range(3):
        sq, sk = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        v = E4M3[vb[sk]] * vd[i][None, :, None]
        ro, rl = ref_attention(E4M3[qb[sq]] * np.repeat(qd[i], 3)[None, :, None],
                               E4M3[kb[sk]] * kd[i][None, :, None], v, causal=True)
        check(out[sq], ro, f"varlen segment {i} out", kind != "numpy",
              p_rounding_atol(np.abs(v).max() if v.size else 0.0))
        check(lse[:, sq], rl, f"varlen segment {i} lse", False)


@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("kind,typ", KINDS)
def test_kvcache_with_appended_fp8_rows(page_size, kind, typ):
    rng = rng_for("fp8-kvcache", page_size, kind, typ)
    b, h, h_k, d, s_q, s_new, capacity = 2, 8, 2, 64, 2, 2, 40
    seqlens = np.array([17, 30], np.int32)
    if page_size is None:
        kc = random_bytes(rng, (b, capacity, h_k, d))
        vc = random_bytes(rng, (b, capacity, h_k, d))
        table = None
    else:
        max_pages = capacity // page_size
        table = rng.permutation(b * max_pages).reshape(b, max_pages).astype(np.int32)
        kc = random_bytes(rng, (b * max_pages, page_size, h_k, d))
        vc = random_bytes(rng, (b * max_pages, page_size, h_k, d))
    qb = random_bytes(rng, (b, s_q, h, d))
    kn, vn = random_bytes(rng, (b, s_new, h_k, d)), random_bytes(rng, (b, s_new, h_k, d))
    qd, qdt = descales(rng, b, h_k, kind)
    kd, kdt = descales(rng, b, h_k, kind)
    vd, vdt = descales(rng, b, h_k, kind)

    def slots(bi, n):
        t = np.arange(n)
        if table is None:
            return (np.full(n, bi), t)
        return (table[bi, t // page_size], t % page_size)

    # Expected caches: the new rows' bytes at [seqlens, seqlens + s_new).
    k_want, v_want = kc.copy(), vc.copy()
    for bi in range(b):
        blk, off = slots(bi, seqlens[bi] + s_new)
        k_want[blk[seqlens[bi]:], off[seqlens[bi]:]] = kn[bi]
        v_want[blk[seqlens[bi]:], off[seqlens[bi]:]] = vn[bi]
    kct, vct = as_kind(kc, kind, typ), as_kind(vc, kind, typ)
    conv = (lambda a: torch.from_numpy(a)) if kind == "torch" else (lambda a: a)
    out, lse, *_ = fai.flash_attn_with_kvcache(
        as_kind(qb, kind, typ), kct, vct, as_kind(kn, kind, typ), as_kind(vn, kind, typ),
        cache_seqlens=conv(seqlens), page_table=None if table is None else conv(table), causal=True,
        q_descale=qdt, k_descale=kdt, v_descale=vdt, return_softmax_lse=True)
    assert out.dtype == expected_out_dtype(kind)
    bits = (lambda x: x) if kind == "numpy" else (lambda x: x.view(torch.uint8).numpy())
    assert np.array_equal(bits(kct), k_want), f"k_cache bytes after the append (seed {SEED})"
    assert np.array_equal(bits(vct), v_want), f"v_cache bytes after the append (seed {SEED})"
    for bi in range(b):
        blk, off = slots(bi, seqlens[bi] + s_new)
        k = E4M3[k_want[blk, off]] * kd[bi][None, :, None]
        v = E4M3[v_want[blk, off]] * vd[bi][None, :, None]
        q = E4M3[qb[bi]] * np.repeat(qd[bi], h // h_k)[None, :, None]
        ro, rl = ref_attention(q, k, v, causal=True)
        # Decode (s_q * h / h_k = 8 rows per KV head): P may be rounded to bf16.
        check(out[bi], ro, f"kvcache out {bi}", kind != "numpy", p_rounding_atol(np.abs(v).max()))
        check(lse[bi], rl, f"kvcache lse {bi}", False)


def test_descales_default_to_one_and_broadcast_rows():
    rng = rng_for("fp8-default")
    qb, kb, vb = random_bytes(rng, (2, 3, 4, 16)), random_bytes(rng, (2, 9, 2, 16)), random_bytes(rng, (2, 9, 2, 16))
    q, k, v = (torch.from_numpy(x) for x in (qb, kb, vb))
    plain = fai.flash_attn_func(q, k, v)
    ones = torch.ones(2, 2)
    assert torch.equal(plain, fai.flash_attn_func(q, k, v, q_descale=ones, k_descale=ones, v_descale=ones))
    # A broadcast row (batch stride 0) equals the same values written out.
    row = torch.tensor([[0.5, 1.5]])
    full = row.repeat(2, 1)
    a = fai.flash_attn_func(q, k, v, k_descale=row.expand(2, 2), v_descale=row.expand(2, 2))
    assert torch.equal(a, fai.flash_attn_func(q, k, v, k_descale=full, v_descale=full))


def test_bad_fp8_inputs_name_the_argument():
    rng = rng_for("fp8-bad")
    qb, kb = random_bytes(rng, (2, 3, 4, 16)), random_bytes(rng, (2, 9, 2, 16))
    q, k = torch.from_numpy(qb), torch.from_numpy(kb)
    with pytest.raises(ValueError, match="k_descale"):
        fai.flash_attn_func(q, k, k, k_descale=torch.ones(2, 3))  # [b, h_k] = [2, 2]
    with pytest.raises(ValueError, match="v_descale"):
        fai.flash_attn_func(q, k, k, v_descale=torch.tensor([[1.0, math.nan]] * 2))
    with pytest.raises(TypeError, match="q_descale"):
        fai.flash_attn_func(q, k, k, q_descale=torch.ones(2, 2, dtype=torch.float64))
    f32 = torch.ones(2, 3, 4, 16)
    with pytest.raises(ValueError, match="q_descale"):
        fai.flash_attn_func(f32, f32[:, :, :2], f32[:, :, :2], q_descale=torch.ones(2, 2))
    with pytest.raises(TypeError, match="k"):
        fai.flash_attn_func(q, k.float(), k)  # operands must share one dtype
    cos = torch.ones(64, 8)
    with pytest.raises(ValueError, match="rotary"):
        fai.flash_attn_with_kvcache(q[:, :1], torch.from_numpy(random_bytes(rng, (2, 40, 2, 16))),
                                    torch.from_numpy(random_bytes(rng, (2, 40, 2, 16))),
                                    cache_seqlens=5, rotary_cos=cos, rotary_sin=cos)
