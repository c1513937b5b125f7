"""ringattn.flash_attn_interface against a float64 NumPy reference (docs/semantics.md
sections 1-3 and 5). Shapes are drawn fresh each run from a printed seed; replay a failure
with RINGATTN_TEST_SEED=<seed>."""

import inspect
import math
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ringattn  # noqa: E402
from ringattn import flash_attn_interface as fai  # noqa: E402

SEED = int(os.environ.get("RINGATTN_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
print(f"test_flash_attn_interface: RINGATTN_TEST_SEED={SEED}")

TORCH_TYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NUMPY_TYPES = {"fp32": np.float32, "fp16": np.float16}
# Unit roundoff of each storage type: the output is rounded once to it.
EPS = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}


def rng_for(*key):
    return np.random.default_rng([SEED, *[hash(str(k)) % (2**31) for k in key]])


# ---- float64 reference ----


def ref_attention(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0, sinks=None, chunk=0,
                  qv=None):
    """q [s_q, h, d], k [s_k, h_k, d], v [s_k, h_k, d_v] (float64) -> out [s_q, h, d_v],
    lse [h, s_q]. Bottom-right mask, GQA by repeating KV heads, empty rows 0 / -inf.
    sinks [h]: one extra logit per head in the softmax denominator (no value); the LSE
    excludes it. chunk > 0: key j visible only in the chunk of the diagonal key i + shift.
    qv [s_q, h, d_v] (FA3): scores scale * (q . k + qv . v), default scale 1/sqrt(d + d_v)."""
    s_q, h, d = q.shape
    s_k, h_k, _ = k.shape
    k = np.repeat(k, h // h_k, axis=1)
    v = np.repeat(v, h // h_k, axis=1)
    d_qk = d if qv is None else d + v.shape[-1]
    scale = 1.0 / math.sqrt(d_qk) if scale is None else scale
    s = np.einsum("qhd,khd->hqk", q, k)
    if qv is not None:
        s = s + np.einsum("qhd,khd->hqk", qv, v)
    s = s * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(s_q)[:, None]
    j = np.arange(s_k)[None, :]
    shift = s_k - s_q
    wl, wr = window
    if causal:
        wr = 0
    vis = np.ones((s_q, s_k), dtype=bool)
    if wr >= 0:
        vis &= j <= i + shift + wr
    if wl >= 0:
        vis &= j >= i + shift - wl
    if chunk > 0:
        vis &= (j // chunk) == ((i + shift) // chunk)
    s = np.where(vis[None], s, -np.inf)
    m = s.max(axis=-1, initial=-np.inf, keepdims=True) if s_k else np.full((h, s_q, 1), -np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    l_sum = p.sum(axis=-1)
    lse = np.where(l_sum > 0, np.log(np.where(l_sum > 0, l_sum, 1.0)) + m_safe[..., 0], -np.inf)
    denom = np.where(l_sum > 0, l_sum, 1.0)
    if sinks is not None:
        with np.errstate(over="ignore"):
            denom = denom + np.exp(np.asarray(sinks, np.float64)[:, None] - m_safe[..., 0])
    p = p / denom[..., None]
    out = np.einsum("hqk,khd->qhd", p, v) if s_k else np.zeros((s_q, h, v.shape[-1]))
    return out, lse


def f64(x):
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return x.detach().to(torch.float64).numpy()


def check(got, want, typ, what, lse=False):
    """max|got - want| within the storage dtype's rounding; -inf must match exactly."""
    got = f64(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape} (seed {SEED})"
    inf_w, inf_g = np.isneginf(want), np.isneginf(got)
    assert np.array_equal(inf_w, inf_g), f"{what}: -inf pattern differs (seed {SEED})"
    assert not np.isnan(got).any(), f"{what}: NaN in result (seed {SEED})"
    fin = ~inf_w
    if not fin.any():
        return
    err = np.abs(got[fin] - want[fin]).max()
    mag = max(1.0, np.abs(want[fin]).max())
    eps = EPS["fp32"] if lse else EPS[typ]
    # fp32 accumulation: ~1e-5 relative; low precision: a few output roundings.
    tol = mag * (4 * eps + 2e-5) if typ != "fp32" or lse else mag * 2e-5
    if lse and typ != "fp32":
        tol = mag * 1e-4
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} (seed {SEED})"


def make(shape, typ, kind, rng, scale=1.0):
    x = rng.standard_normal(shape) * scale
    if kind == "numpy":
        return x.astype(NUMPY_TYPES[typ])
    return torch.from_numpy(x.astype(np.float32)).to(TORCH_TYPES[typ])


def random_mask(rng):
    causal = bool(rng.integers(2))
    window = (-1, -1)
    if rng.integers(3) == 0:
        window = (int(rng.integers(-1, 6)), -1 if causal else int(rng.integers(-1, 4)))
    softcap = float(rng.choice([0.0, 0.0, 5.0]))
    return causal, window, softcap


HEADS = [(6, 6), (6, 2), (6, 1), (4, 2)]
DIMS = [(16, 16), (32, 16), (8, 24), (64, 64), (128, 128), (48, 32)]
KINDS = [("torch", "fp32"), ("torch", "bf16"), ("torch", "fp16"), ("numpy", "fp32"), ("numpy", "fp16")]


# ---- dense ----


@pytest.mark.parametrize("kind,typ", KINDS)
def test_dense_against_reference(kind, typ):
    rng = rng_for("dense", kind, typ)
    for trial in range(10):
        b = int(rng.integers(1, 3))
        s_q, s_k = [(1, 1), (1, 7), (3, 1), (13, 29), (29, 13), (5, 2), (17, 40)][int(rng.integers(7))]
        h, h_k = HEADS[int(rng.integers(len(HEADS)))]
        d, d_v = DIMS[int(rng.integers(len(DIMS)))]
        causal, window, softcap = random_mask(rng)
        scale = None if rng.integers(2) else float(rng.uniform(0.05, 0.3))
        q = make((b, s_q, h, d), typ, kind, rng)
        k = make((b, s_k, h_k, d), typ, kind, rng)
        v = make((b, s_k, h_k, d_v), typ, kind, rng)
        out, lse = fai.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window,
                                       softcap=softcap, return_attn_probs=True)
        assert type(out) is type(q) and out.dtype == q.dtype
        assert tuple(lse.shape) == (b, h, s_q) and ("float32" in str(lse.dtype))
        what = f"dense trial {trial} b={b} s=({s_q},{s_k}) h=({h},{h_k}) d=({d},{d_v}) mask={causal, window, softcap}"
        for bi in range(b):
            ro, rl = ref_attention(f64(q[bi]), f64(k[bi]), f64(v[bi]), scale, causal, window, softcap)
            check(out[bi], ro, typ, what + " out")
            check(lse[bi], rl, typ, what + " lse", lse=True)
        # The plain call returns the output alone, identical to the tuple's.
        alone = fai.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window,
                                    softcap=softcap)
        assert np.array_equal(f64(alone), f64(out), equal_nan=True)


def sink_values(rng, h):
    """Sink logits covering every regime: no sink (-inf), +inf (output 0), finite values."""
    pool = np.array([-np.inf, np.inf, -2.0, 0.0, 1.5, 3.0, 6.0], np.float32)
    s = rng.choice(pool, size=h).astype(np.float32)
    s[0] = rng.uniform(-1, 4)
    return s


@pytest.mark.parametrize("kind,typ", KINDS)
@pytest.mark.parametrize("alias", ["sinks", "s_aux"])
def test_sinks_against_reference(kind, typ, alias):
    rng = rng_for("sinks", kind, typ, alias)
    for trial in range(6):
        b = int(rng.integers(1, 3))
        s_q, s_k = [(1, 7), (13, 29), (29, 13), (4, 300), (5, 2)][int(rng.integers(5))]
        h, h_k = HEADS[int(rng.integers(len(HEADS)))]
        d, d_v = DIMS[int(rng.integers(len(DIMS)))]
        causal, window, softcap = random_mask(rng)
        snk = sink_values(rng, h)
        sinks = snk if kind == "numpy" else torch.from_numpy(snk)
        num_splits = int(rng.choice([0, 1, 3]))
        q = make((b, s_q, h, d), typ, kind, rng)
        k = make((b, s_k, h_k, d), typ, kind, rng)
        v = make((b, s_k, h_k, d_v), typ, kind, rng)
        out, lse = fai.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                       num_splits=num_splits, return_attn_probs=True, **{alias: sinks})
        what = f"sinks trial {trial} s=({s_q},{s_k}) h=({h},{h_k}) mask={causal, window, softcap} sinks={snk}"
        for bi in range(b):
            ro, rl = ref_attention(f64(q[bi]), f64(k[bi]), f64(v[bi]), None, causal, window, softcap, snk)
            check(out[bi], ro, typ, what + " out")
            check(lse[bi], rl, typ, what + " lse", lse=True)
        # Varlen: the same problem packed, one segment per batch element.
        if b == 1:
            continue
        cu_q = np.arange(b + 1, dtype=np.int32) * s_q
        cu_k = np.arange(b + 1, dtype=np.int32) * s_k
        pack = (lambda x: x.reshape(-1, *x.shape[2:]))
        vo, vl = fai.flash_attn_varlen_func(pack(q), pack(k), pack(v), cu_q, cu_k, s_q, s_k, causal=causal,
                                            window_size=window, softcap=softcap, return_attn_probs=True,
                                            **{alias: sinks})
        check(vo, f64(out).reshape(-1, h, d_v), typ, what + " varlen out")


@pytest.mark.parametrize("kind,typ", KINDS)
def test_attention_chunk_against_reference(kind, typ):
    rng = rng_for("chunk", kind, typ)
    for trial in range(6):
        b = int(rng.integers(1, 3))
        s_q, s_k = [(1, 70), (13, 29), (29, 13), (40, 40), (7, 300)][int(rng.integers(5))]
        h, h_k = HEADS[int(rng.integers(len(HEADS)))]
        d, d_v = DIMS[int(rng.integers(len(DIMS)))]
        causal, window, softcap = random_mask(rng)
        chunk = int(rng.choice([1, 3, 8, 16, 64]))
        with_sinks = bool(rng.integers(2))
        snk = sink_values(rng, h) if with_sinks else None
        sinks = None if snk is None else (snk if kind == "numpy" else torch.from_numpy(snk))
        q = make((b, s_q, h, d), typ, kind, rng)
        k = make((b, s_k, h_k, d), typ, kind, rng)
        v = make((b, s_k, h_k, d_v), typ, kind, rng)
        out, lse = fai.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                       attention_chunk=chunk, sinks=sinks, num_splits=int(rng.choice([0, 1, 2])),
                                       return_attn_probs=True)
        what = f"chunk trial {trial} s=({s_q},{s_k}) chunk={chunk} mask={causal, window, softcap} sinks={snk}"
        for bi in range(b):
            ro, rl = ref_attention(f64(q[bi]), f64(k[bi]), f64(v[bi]), None, causal, window, softcap, snk, chunk)
            check(out[bi], ro, typ, what + " out")
            check(lse[bi], rl, typ, what + " lse", lse=True)
        if b == 1:
            continue
        # Varlen: the chunk grid restarts in every segment.
        cu_q = np.arange(b + 1, dtype=np.int32) * s_q
        cu_k = np.arange(b + 1, dtype=np.int32) * s_k
        pack = (lambda x: x.reshape(-1, *x.shape[2:]))
        vo = fai.flash_attn_varlen_func(pack(q), pack(k), pack(v), cu_q, cu_k, s_q, s_k, causal=causal,
                                        window_size=window, softcap=softcap, attention_chunk=chunk, sinks=sinks)
        check(vo, f64(out).reshape(-1, h, d_v), typ, what + " varlen out")
    with pytest.raises(ValueError, match="attention_chunk"):
        fai.flash_attn_func(q, k, v, attention_chunk=-2)


def test_sinks_edge_values_and_errors():
    rng = rng_for("sinks-edges")
    q, k, v = (make(s, "fp32", "torch", rng) for s in ((2, 3, 4, 16), (2, 9, 2, 16), (2, 9, 2, 16)))
    base, lse0 = fai.flash_attn_func(q, k, v, return_attn_probs=True)
    out, lse = fai.flash_attn_func(q, k, v, return_attn_probs=True, sinks=torch.full((4,), -math.inf))
    assert torch.equal(out, base) and torch.equal(lse, lse0)
    out, lse = fai.flash_attn_func(q, k, v, return_attn_probs=True, s_aux=torch.full((4,), math.inf))
    assert torch.count_nonzero(out) == 0 and torch.equal(lse, lse0)
    # fp16 / bf16 sinks are widened; the other kind of tensor is refused.
    out16 = fai.flash_attn_func(q, k, v, sinks=torch.zeros(4, dtype=torch.float16))
    assert torch.allclose(out16, fai.flash_attn_func(q, k, v, sinks=torch.zeros(4)))
    with pytest.raises(ValueError, match=r"sinks\[2\]"):
        fai.flash_attn_func(q, k, v, sinks=torch.tensor([0.0, 1.0, math.nan, 2.0]))
    with pytest.raises(ValueError, match="sinks"):
        fai.flash_attn_func(q, k, v, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="s_aux"):
        fai.flash_attn_func(q, k, v, sinks=torch.zeros(4), s_aux=torch.zeros(4))
    with pytest.raises((TypeError, ValueError), match="sinks"):
        fai.flash_attn_func(q, k, v, sinks=np.zeros(4, np.float32))


def test_fully_masked_rows_are_zero_with_neg_inf_lse():
    rng = rng_for("masked")
    q, k, v = make((1, 5, 2, 16), "fp32", "torch", rng), make((1, 2, 2, 16), "fp32", "torch", rng), \
        make((1, 2, 2, 16), "fp32", "torch", rng)
    out, lse = fai.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[0, :3] == 0) and torch.all(torch.isneginf(lse[0, :, :3]))
    assert torch.all(torch.isfinite(lse[0, :, 3:]))


def test_empty_problems():
    z = torch.zeros
    out = fai.flash_attn_func(z(0, 3, 2, 16), z(0, 3, 2, 16), z(0, 3, 2, 16))
    assert tuple(out.shape) == (0, 3, 2, 16)
    out, lse = fai.flash_attn_func(z(1, 0, 2, 16), z(1, 3, 2, 16), z(1, 3, 2, 16), return_attn_probs=True)
    assert tuple(out.shape) == (1, 0, 2, 16) and tuple(lse.shape) == (1, 2, 0)
    # No query rows, but the new keys are still appended.
    kc = z(2, 4, 2, 16)
    fai.flash_attn_with_kvcache(z(2, 0, 2, 16), kc, z(2, 4, 2, 16), torch.ones(2, 1, 2, 16),
                                torch.ones(2, 1, 2, 16), cache_seqlens=2)
    assert torch.all(kc[:, 2] == 1) and torch.all(kc[:, 3] == 0)


def test_num_splits_do_not_change_results():
    rng = rng_for("splits")
    q = make((1, 3, 4, 32), "fp32", "torch", rng)
    k = make((1, 700, 2, 32), "fp32", "torch", rng)
    v = make((1, 700, 2, 32), "fp32", "torch", rng)
    base, base_lse = fai.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    for n in (0, 2, 3, 7, -1):
        o, l = fai.flash_attn_func(q, k, v, causal=True, num_splits=n, pack_gqa=True, sm_margin=4,
                                   deterministic=True, return_attn_probs=True)
        assert (o - base).abs().max() <= 1e-5 and (l - base_lse).abs().max() <= 1e-5, f"num_splits={n}"


def test_strided_views_are_read_in_place():
    # q, k, v as head slices of one packed [b, s, h + 2 h_k, d] tensor (FA3's qkvpacked
    # layout): not contiguous, last dim contiguous.
    rng = rng_for("views")
    b, s, h, h_k, d = 2, 9, 4, 2, 16
    qkv = make((b, s, h + 2 * h_k, d), "fp32", "torch", rng)
    q, k, v = qkv[:, :, :h], qkv[:, :, h:h + h_k], qkv[:, :, h + h_k:]
    assert not q.is_contiguous()
    out = fai.flash_attn_func(q, k, v, causal=True)
    for bi in range(b):
        ro, _ = ref_attention(f64(q[bi]), f64(k[bi]), f64(v[bi]), causal=True)
        check(out[bi], ro, "fp32", "packed qkv")
    # numpy: a transposed [b, h, s, d] buffer viewed as [b, s, h, d].
    qn = make((b, h, s, d), "fp32", "numpy", rng).transpose(0, 2, 1, 3)
    kn = make((b, h_k, s, d), "fp32", "numpy", rng).transpose(0, 2, 1, 3)
    vn = make((b, h_k, s, d), "fp32", "numpy", rng).transpose(0, 2, 1, 3)
    out = fai.flash_attn_func(qn, kn, vn)
    for bi in range(b):
        ro, _ = ref_attention(f64(qn[bi]), f64(kn[bi]), f64(vn[bi]))
        check(out[bi], ro, "fp32", "transposed numpy views")


def test_against_torch_sdpa():
    F = torch.nn.functional
    if not hasattr(F, "scaled_dot_product_attention"):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.scaled_dot_product_attention")
    rng = rng_for("sdpa")
    for causal in (False, True):
        q = make((2, 17, 4, 32), "fp32", "torch", rng)
        k = make((2, 17, 4, 32), "fp32", "torch", rng)
        v = make((2, 17, 4, 32), "fp32", "torch", rng)
        want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)
        got = fai.flash_attn_func(q, k, v, causal=causal)
        assert (got - want).abs().max() <= 1e-4, f"causal={causal} (seed {SEED})"


# ---- varlen ----


@pytest.mark.parametrize("kind,typ", [("torch", "fp32"), ("torch", "bf16"), ("numpy", "fp16")])
def test_varlen_against_reference(kind, typ):
    rng = rng_for("varlen", kind, typ)
    for trial in range(8):
        b = int(rng.integers(1, 5))
        lq = rng.integers(0, 12, size=b)
        lk = rng.integers(0, 15, size=b)
        lk[int(rng.integers(b))] = 0  # a segment without keys
        lq[int(rng.integers(b))] = max(lq[int(rng.integers(b))], 1)
        h, h_k = HEADS[int(rng.integers(len(HEADS)))]
        d, d_v = DIMS[int(rng.integers(len(DIMS)))]
        causal, window, softcap = random_mask(rng)
        cq = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
        ck = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
        extra = int(rng.integers(0, 3))  # rows of q past cu_seqlens_q[-1]
        total_q, total_k = int(cq[-1]) + extra, int(ck[-1]) + 1
        q = make((total_q, h, d), typ, kind, rng)
        k = make((total_k, h_k, d), typ, kind, rng)
        v = make((total_k, h_k, d_v), typ, kind, rng)
        use_seqused = bool(rng.integers(2))
        sq = (rng.integers(0, lq + 1)).astype(np.int32) if use_seqused else None
        sk = (rng.integers(0, lk + 1)).astype(np.int32) if use_seqused else None
        idx = (lambda a: a) if kind == "numpy" else (lambda a: None if a is None else torch.from_numpy(a))
        out, lse = fai.flash_attn_varlen_func(
            q, k, v, idx(cq), idx(ck), int(lq.max()), int(lk.max()), seqused_q=idx(sq), seqused_k=idx(sk),
            causal=causal, window_size=window, softcap=softcap, return_attn_probs=True)
        assert tuple(out.shape) == (total_q, h, d_v) and tuple(lse.shape) == (h, total_q)
        what = f"varlen trial {trial} lq={lq} lk={lk} seqused={sq, sk} mask={causal, window, softcap}"
        want_o = np.zeros((total_q, h, d_v))
        want_l = np.full((h, total_q), -np.inf)
        for i in range(b):
            nq = int(sq[i]) if use_seqused else int(lq[i])
            nk = int(sk[i]) if use_seqused else int(lk[i])
            qs = slice(int(cq[i]), int(cq[i]) + nq)
            ks = slice(int(ck[i]), int(ck[i]) + nk)
            ro, rl = ref_attention(f64(q[qs]), f64(k[ks]), f64(v[ks]), None, causal, window, softcap)
            want_o[qs], want_l[:, qs] = ro, rl
        check(out, want_o, typ, what + " out")
        check(lse, want_l, typ, what + " lse", lse=True)


# ---- KV cache ----


def paged_layout(rng, b, capacity, page_size, spare=3):
    """A random page table [b, max_pages] over a shuffled pool of blocks (plus spares)."""
    max_pages = -(-capacity // page_size)
    num_blocks = b * max_pages + spare
    perm = rng.permutation(num_blocks)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    return perm, num_blocks


def cache_slots(page_table, page_size, row, n):
    """(block, offset) of the first n token slots of page-table row `row`."""
    t = np.arange(n)
    return page_table[row, t // page_size], t % page_size


@pytest.mark.parametrize("page_size", [None, 1, 4, 16])
@pytest.mark.parametrize("kind,typ", [("torch", "fp32"), ("torch", "bf16"), ("torch", "fp16"), ("numpy", "fp32")])
def test_kvcache_against_reference(page_size, kind, typ):
    rng = rng_for("kvcache", page_size, kind, typ)
    for trial in range(4):
        b = int(rng.integers(1, 4))
        s_q = int(rng.integers(1, 5))
        s_new = int(rng.integers(0, 4))
        h, h_k = HEADS[int(rng.integers(len(HEADS)))]
        d, d_v = DIMS[int(rng.integers(len(DIMS)))]
        causal, window, softcap = random_mask(rng)
        capacity = int(rng.integers(s_new + 1, 40))
        seqlens = rng.integers(0, capacity - s_new + 1, size=b).astype(np.int32)
        leftpad = None
        if rng.integers(2):
            leftpad = (rng.integers(0, seqlens + 1)).astype(np.int32)
        batch_idx = None
        if page_size is None:
            b_cache = b + int(rng.integers(0, 3))
            shape_k, shape_v = (b_cache, capacity, h_k, d), (b_cache, capacity, h_k, d_v)
            if rng.integers(2):
                batch_idx = rng.permutation(b_cache)[:b].astype(np.int32)
            page_table = None
        else:
            page_table, num_blocks = paged_layout(rng, b, capacity, page_size)
            shape_k, shape_v = (num_blocks, page_size, h_k, d), (num_blocks, page_size, h_k, d_v)
            if rng.integers(2):
                batch_idx = rng.permutation(b).astype(np.int32)
        # Unused slots hold NaN: the kernel must never read them.
        k_cache = make(shape_k, typ, kind, rng)
        v_cache = make(shape_v, typ, kind, rng)
        k_cache[...] = np.nan
        v_cache[...] = np.nan
        k_fill = make((b, capacity, h_k, d), typ, kind, rng)
        v_fill = make((b, capacity, h_k, d_v), typ, kind, rng)
        rows = batch_idx if batch_idx is not None else np.arange(b)
        for i in range(b):
            lo, hi = int(leftpad[i]) if leftpad is not None else 0, int(seqlens[i])
            if page_table is None:
                k_cache[rows[i], lo:hi] = k_fill[i, lo:hi]
                v_cache[rows[i], lo:hi] = v_fill[i, lo:hi]
            else:
                blk, off = cache_slots(page_table, page_size, rows[i], hi)
                for t in range(lo, hi):
                    k_cache[int(blk[t]), int(off[t])] = k_fill[i, t]
                    v_cache[int(blk[t]), int(off[t])] = v_fill[i, t]
        q = make((b, s_q, h, d), typ, kind, rng)
        k_new = make((b, s_new, h_k, d), typ, kind, rng) if s_new else None
        v_new = make((b, s_new, h_k, d_v), typ, kind, rng) if s_new else None
        conv = (lambda a: a) if kind == "numpy" else (lambda a: None if a is None else torch.from_numpy(a))
        out, lse, acc_o, acc_l = fai.flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=conv(seqlens),
            cache_batch_idx=conv(batch_idx), cache_leftpad=conv(leftpad), page_table=conv(page_table),
            causal=causal, window_size=window, softcap=softcap, return_softmax_lse=True)
        assert tuple(acc_o.shape) == (0,) and tuple(acc_l.shape) == (0,)
        assert type(out) is type(q) and out.dtype == q.dtype
        what = (f"kvcache trial {trial} page={page_size} b={b} s_q={s_q} s_new={s_new} h=({h},{h_k}) "
                f"d=({d},{d_v}) seqlens={seqlens} leftpad={leftpad} idx={batch_idx} mask={causal, window, softcap}")
        for i in range(b):
            lo, c = int(leftpad[i]) if leftpad is not None else 0, int(seqlens[i])
            keys = f64(k_fill[i, lo:c])
            vals = f64(v_fill[i, lo:c])
            if s_new:
                keys = np.concatenate([keys, f64(k_new[i])])
                vals = np.concatenate([vals, f64(v_new[i])])
                # The new rows landed in the caller's cache, exactly.
                for r in range(s_new):
                    t = c + r
                    if page_table is None:
                        slot_k, slot_v = k_cache[rows[i], t], v_cache[rows[i], t]
                    else:
                        blk, off = cache_slots(page_table, page_size, rows[i], t + 1)
                        slot_k, slot_v = k_cache[int(blk[t]), int(off[t])], v_cache[int(blk[t]), int(off[t])]
                    assert np.array_equal(f64(slot_k), f64(k_new[i, r])), what + f" append k row {r}"
                    assert np.array_equal(f64(slot_v), f64(v_new[i, r])), what + f" append v row {r}"
            ro, rl = ref_attention(f64(q[i]), keys, vals, None, causal, window, softcap)
            check(out[i], ro, typ, what + f" out[{i}]")
            check(lse[i], rl, typ, what + f" lse[{i}]", lse=True)


def rotate(x, cos, sin, pos, interleaved):
    """Rotary embedding of x [n, h, d] (float64) at positions pos [n]."""
    x = x.copy()
    half = cos.shape[1]
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    if interleaved:
        a, b = x[..., 0:2 * half:2].copy(), x[..., 1:2 * half:2].copy()
        x[..., 0:2 * half:2], x[..., 1:2 * half:2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :half].copy(), x[..., half:2 * half].copy()
        x[..., :half], x[..., half:2 * half] = a * c - b * s, a * s + b * c
    return x


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary(interleaved, causal):
    rng = rng_for("rotary", interleaved, causal)
    b, s_q, s_new, h, h_k, d, cap = 2, 3, 2, 4, 2, 32, 20
    rot = 16
    seqlens = np.array([5, 11], dtype=np.int32)
    ang = rng.uniform(0, 2 * np.pi, size=(cap, rot // 2))
    cos, sin = torch.from_numpy(np.cos(ang).astype(np.float32)), torch.from_numpy(np.sin(ang).astype(np.float32))
    k_cache = make((b, cap, h_k, d), "fp32", "torch", rng)
    v_cache = make((b, cap, h_k, d), "fp32", "torch", rng)
    k_cache[:, 15:] = float("nan")
    v_cache[:, 15:] = float("nan")
    before_k = f64(k_cache).copy()
    q = make((b, s_q, h, d), "fp32", "torch", rng)
    k_new = make((b, s_new, h_k, d), "fp32", "torch", rng)
    v_new = make((b, s_new, h_k, d), "fp32", "torch", rng)
    out = fai.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                      cache_seqlens=torch.from_numpy(seqlens), causal=causal,
                                      rotary_interleaved=interleaved)
    c64, s64 = f64(cos), f64(sin)
    for i in range(b):
        c = int(seqlens[i])
        kr = rotate(f64(k_new[i]), c64, s64, c + np.arange(s_new), interleaved)
        np.testing.assert_allclose(f64(k_cache[i, c:c + s_new]), kr, atol=1e-5, err_msg=f"seed {SEED}")
        qpos = c + (np.arange(s_q) if causal else np.zeros(s_q, dtype=int))
        qr = rotate(f64(q[i]), c64, s64, qpos, interleaved)
        keys = np.concatenate([before_k[i, :c], kr])
        vals = np.concatenate([f64(v_cache[i, :c]), f64(v_new[i])])
        ro, _ = ref_attention(qr, keys, vals, None, causal)
        check(out[i], ro, "fp32", f"rotary interleaved={interleaved} causal={causal}")


def test_kvcache_int_seqlens_none_and_num_splits():
    rng = rng_for("kv-misc")
    b, h, h_k, d, cap = 3, 4, 1, 16, 300
    k_cache = make((b, cap, h_k, d), "fp32", "torch", rng)
    v_cache = make((b, cap, h_k, d), "fp32", "torch", rng)
    q = make((b, 1, h, d), "fp32", "torch", rng)
    full = fai.flash_attn_with_kvcache(q, k_cache, v_cache)  # cache_seqlens None: whole cache
    as_int = fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cap)
    assert torch.equal(full, as_int)
    for i in range(b):
        ro, _ = ref_attention(f64(q[i]), f64(k_cache[i]), f64(v_cache[i]))
        check(full[i], ro, "fp32", "whole cache")
    part = fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=250)
    for n in (1, 2, 5):
        o = fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=250, num_splits=n)
        assert (o - part).abs().max() <= 1e-5, f"num_splits={n}"


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_scheduler_metadata_plan_matches_no_plan(kind):
    rng = rng_for("plan", kind)
    b, s_q, h, h_k, d, cap, s_new = 3, 1, 4, 2, 32, 600, 1
    seqlens = np.array([599, 17, 300], dtype=np.int32)
    conv = (lambda a: a) if kind == "numpy" else torch.from_numpy
    k_cache = make((b, cap, h_k, d), "fp32", kind, rng)
    v_cache = make((b, cap, h_k, d), "fp32", kind, rng)
    q = make((b, s_q, h, d), "fp32", kind, rng)
    k_new = make((b, s_new, h_k, d), "fp32", kind, rng)
    v_new = make((b, s_new, h_k, d), "fp32", kind, rng)
    md = fai.get_scheduler_metadata(b, s_q, cap, h, h_k, d, conv(seqlens), qkv_dtype="fp32",
                                    max_seqlen_k_new=s_new, causal=True)
    assert type(md) is type(conv(seqlens)) and tuple(md.shape) == (b,) and "int32" in str(md.dtype)
    assert int(md.min()) >= 1
    kc2, vc2 = (k_cache.copy(), v_cache.copy()) if kind == "numpy" else (k_cache.clone(), v_cache.clone())
    with_plan = fai.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=conv(seqlens),
                                            causal=True, scheduler_metadata=md)
    no_plan = fai.flash_attn_with_kvcache(q, kc2, vc2, k_new, v_new, cache_seqlens=conv(seqlens), causal=True)
    assert np.abs(f64(with_plan) - f64(no_plan)).max() <= 1e-5
    forced = np.full(b, 4, dtype=np.int32)
    o = fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=conv(seqlens + 1), causal=True,
                                    scheduler_metadata=conv(forced))
    assert np.abs(f64(o) - f64(no_plan)).max() <= 1e-5
    with pytest.raises(ValueError, match="scheduler_metadata"):
        fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=conv(seqlens),
                                    scheduler_metadata=conv(forced[:2]))
    if kind == "torch":
        md_bf16 = fai.get_scheduler_metadata(b, s_q, cap, h, h_k, d, conv(seqlens), qkv_dtype=torch.bfloat16)
        assert tuple(md_bf16.shape) == (b,)


def test_kvcache_writes_into_strided_caches_in_place():
    # k_cache and v_cache are views into one [b, s, 2, h_k, d] buffer (torch) / one numpy array.
    rng = rng_for("kv-views")
    b, cap, h, h_k, d = 2, 12, 4, 2, 16
    kv = make((b, cap, 2, h_k, d), "fp32", "torch", rng)
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    q = make((b, 2, h, d), "fp32", "torch", rng)
    k_new = make((b, 2, h_k, d), "fp32", "torch", rng)
    v_new = make((b, 2, h_k, d), "fp32", "torch", rng)
    fai.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=torch.tensor([3, 7], dtype=torch.int32))
    assert torch.equal(kv[0, 3:5, 0], k_new[0]) and torch.equal(kv[1, 7:9, 1], v_new[1])
    kvn = make((b, cap, 2, h_k, d), "fp32", "numpy", rng)
    kn, vn = kvn[:, :, 0], kvn[:, :, 1]
    assert np.shares_memory(kn, kvn)
    k_new_n = make((b, 1, h_k, d), "fp32", "numpy", rng)
    fai.flash_attn_with_kvcache(make((b, 1, h, d), "fp32", "numpy", rng), kn, vn, k_new_n,
                                make((b, 1, h_k, d), "fp32", "numpy", rng), cache_seqlens=5)
    assert np.array_equal(kvn[:, 5, 0], k_new_n[:, 0])


@pytest.mark.parametrize("kind,typ", [("torch", "fp32"), ("torch", "bf16"), ("numpy", "fp16")])
def test_kvcache_one_call_path_equals_python_path(kind, typ, monkeypatch):
    # The common call runs in one C++ call (_C.kvcache_fast); with it disabled the Python
    # path runs. Both must give bit-identical outputs, LSE and appended caches.
    rng = rng_for("kv-fast", kind, typ)
    b, s_q, s_new, h, h_k, d, d_v, page = 3, 2, 2, 8, 2, 64, 32, 16
    conv = (lambda a: a) if kind == "numpy" else torch.from_numpy
    page_table, num_blocks = paged_layout(rng, b, 64, page)
    seqlens = rng.integers(0, 60, size=b).astype(np.int32)
    plan = np.full(b, 2, dtype=np.int32)
    q = make((b, s_q, h, d), typ, kind, rng)
    k_new, v_new = make((b, s_new, h_k, d), typ, kind, rng), make((b, s_new, h_k, d_v), typ, kind, rng)
    k0, v0 = make((num_blocks, page, h_k, d), typ, kind, rng), make((num_blocks, page, h_k, d_v), typ, kind, rng)
    args = dict(cache_seqlens=conv(seqlens), page_table=conv(page_table), causal=True, window_size=(7, -1),
                softcap=3.0, softmax_scale=0.2, scheduler_metadata=conv(plan), return_softmax_lse=True)
    copy = (lambda x: x.copy()) if kind == "numpy" else (lambda x: x.clone())
    kc, vc = copy(k0), copy(v0)
    direct = ringattn._C.kvcache_fast(q, kc, vc, k_new, v_new, None, None, args["cache_seqlens"], None, None,
                                      args["page_table"], 0.2, True, (7, -1), 3.0, args["scheduler_metadata"], 0,
                                      True)
    assert direct is not None, "the common call should take the one-call path"
    kc, vc = copy(k0), copy(v0)
    fast = fai.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, **args)
    monkeypatch.setattr(ringattn._C, "kvcache_fast", lambda *a: None)
    kc2, vc2 = copy(k0), copy(v0)
    slow = fai.flash_attn_with_kvcache(q, kc2, vc2, k_new, v_new, **args)
    for a, b_ in zip(fast[:2] + (kc, vc), slow[:2] + (kc2, vc2)):
        assert type(a) is type(b_) and a.dtype == b_.dtype and tuple(a.shape) == tuple(b_.shape)
        assert np.array_equal(f64(a), f64(b_), equal_nan=True)
    assert tuple(fast[2].shape) == (0,) and tuple(fast[3].shape) == (0,)
    assert fast[0].dtype == q.dtype
    # An int cache_seqlens takes the one-call path too; rotary tables take the Python path.
    assert ringattn._C.kvcache_fast is not None
    monkeypatch.undo()
    assert ringattn._C.kvcache_fast(q, kc, vc, None, None, None, None, 5, None, None, conv(page_table), None,
                                    False, (-1, -1), 0.0, None, 0, False) is not None
    cos = make((64, 8), "fp32", kind, rng)
    assert ringattn._C.kvcache_fast(q, kc, vc, None, None, cos, cos, 5, None, None, conv(page_table), None,
                                    False, (-1, -1), 0.0, None, 0, False) is None


# ---- combine ----


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_combine_against_reference(kind):
    rng = rng_for("combine", kind)
    n, b, s, h, d = 4, 2, 3, 5, 24
    op = rng.standard_normal((n, b, s, h, d)).astype(np.float32)
    lse_bhs = rng.standard_normal((n, b, h, s)).astype(np.float32) * 3
    lse_bhs[1, 0, 2, 1] = -np.inf  # one empty split
    lse_bhs[2, 1, 0, 0] = np.inf  # +inf counts as empty too
    lse_bhs[:, 1, 4, 2] = -np.inf  # a row with no keys at all
    lp = lse_bhs.transpose(0, 1, 3, 2)  # FA3's layout: [n, b, s, h], contiguous along s
    lp_ref = np.where(np.isposinf(lp), -np.inf, lp).astype(np.float64)
    m = lp_ref.max(axis=0)
    m_safe = np.where(np.isfinite(m), m, 0)
    w = np.exp(lp_ref - m_safe)
    tot = w.sum(axis=0)
    want_l = np.where(tot > 0, np.log(np.where(tot > 0, tot, 1)) + m_safe, -np.inf)
    want_o = (w[..., None] * op).sum(axis=0) / np.where(tot > 0, tot, 1)[..., None]
    if kind == "torch":
        op, lp = torch.from_numpy(op), torch.from_numpy(lse_bhs).transpose(2, 3)
    out, lse = fai.flash_attn_combine(op, lp)
    check(out, want_o, "fp32", "combine out")
    check(lse, want_l, "fp32", "combine lse", lse=True)
    assert tuple(lse.shape) == (b, s, h) and "float32" in str(out.dtype)
    out16, _ = fai.flash_attn_combine(op, lp, out_dtype="fp16" if kind == "numpy" else torch.bfloat16)
    check(out16, want_o, "fp16" if kind == "numpy" else "bf16", "combine out_dtype")
    given = np.zeros((b, s, h, d), np.float32) if kind == "numpy" else torch.zeros(b, s, h, d)
    ret, _ = fai.flash_attn_combine(op, lp, out=given)
    assert ret is given
    check(given, want_o, "fp32", "combine into out")


def test_combine_matches_split_attention():
    # Two halves of the keys attended separately, then combined = attention over all keys.
    rng = rng_for("combine-attn")
    q = make((1, 4, 2, 16), "fp32", "torch", rng)
    k = make((1, 30, 2, 16), "fp32", "torch", rng)
    v = make((1, 30, 2, 16), "fp32", "torch", rng)
    parts = [fai.flash_attn_func(q, k[:, a:z], v[:, a:z], return_attn_probs=True) for a, z in ((0, 11), (11, 30))]
    op = torch.stack([p[0] for p in parts])
    lp = torch.stack([p[1] for p in parts]).transpose(2, 3)
    out, lse = fai.flash_attn_combine(op, lp)
    whole, whole_lse = fai.flash_attn_func(q, k, v, return_attn_probs=True)
    assert (out - whole).abs().max() <= 1e-5 and (lse.transpose(1, 2) - whole_lse).abs().max() <= 1e-5


# ---- API shape and errors ----


FA3_SIGNATURES = {
    "flash_attn_func": ["q", "k", "v", "softmax_scale", "causal", "qv", "q_descale", "k_descale", "v_descale",
                        "window_size", "attention_chunk", "softcap", "num_splits", "pack_gqa", "deterministic",
                        "sm_margin", "return_attn_probs"],
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                               "seqused_q", "seqused_k", "softmax_scale", "causal", "qv", "q_descale",
                               "k_descale", "v_descale", "window_size", "attention_chunk", "softcap",
                               "num_splits", "pack_gqa", "deterministic", "sm_margin", "return_attn_probs"],
    "flash_attn_with_kvcache": ["q", "k_cache", "v_cache", "k", "v", "qv", "rotary_cos", "rotary_sin",
                                "cache_seqlens", "cache_batch_idx", "cache_leftpad", "page_table", "cu_seqlens_q",
                                "cu_seqlens_k_new", "max_seqlen_q", "rotary_seqlens", "q_descale", "k_descale",
                                "v_descale", "softmax_scale", "causal", "window_size", "attention_chunk",
                                "softcap", "rotary_interleaved", "scheduler_metadata", "num_splits", "pack_gqa",
                                "sm_margin", "return_softmax_lse"],
    "get_scheduler_metadata": ["batch_size", "max_seqlen_q", "max_seqlen_k", "num_heads_q", "num_heads_kv",
                               "headdim", "cache_seqlens", "qkv_dtype", "headdim_v", "cu_seqlens_q",
                               "cu_seqlens_k_new", "cache_leftpad", "page_size", "max_seqlen_k_new", "causal",
                               "window_size", "attention_chunk", "has_softcap", "num_splits", "pack_gqa",
                               "sm_margin"],
    "flash_attn_combine": ["out_partial", "lse_partial", "out", "out_dtype"],
}


def test_signatures_follow_fa3_and_module_alias_works():
    for name, params in FA3_SIGNATURES.items():
        sig = inspect.signature(getattr(fai, name))
        positional = [p.name for p in sig.parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert positional == params, name
    sig = inspect.signature(fai.flash_attn_with_kvcache)
    assert sig.parameters["num_splits"].default == 0 and sig.parameters["rotary_interleaved"].default is True
    assert inspect.signature(fai.flash_attn_func).parameters["num_splits"].default == 1
    sys.modules["flash_attn_interface"] = ringattn.flash_attn_interface
    try:
        from flash_attn_interface import flash_attn_func  # noqa: PLC0415
        assert flash_attn_func is fai.flash_attn_func
    finally:
        del sys.modules["flash_attn_interface"]


def _dense(**over):
    rng = rng_for("errors")
    args = dict(q=make((2, 3, 4, 16), "fp32", "torch", rng), k=make((2, 5, 2, 16), "fp32", "torch", rng),
                v=make((2, 5, 2, 16), "fp32", "torch", rng))
    args.update(over)
    return args


def _kv(**over):
    rng = rng_for("kv-errors")
    args = dict(q=make((2, 1, 4, 16), "fp32", "torch", rng), k_cache=make((2, 8, 2, 16), "fp32", "torch", rng),
                v_cache=make((2, 8, 2, 16), "fp32", "torch", rng), cache_seqlens=3)
    args.update(over)
    return args


def test_unsupported_arguments_raise_value_error_naming_them():
    t = torch.ones(2, 2)
    # Descales on non-fp8 inputs are a ValueError naming them (tests/python/test_fp8.py).
    for name, value in [("q_descale", t), ("k_descale", t), ("v_descale", t),
                        ("dropout_p", 0.1), ("alibi_slopes", torch.ones(4))]:
        with pytest.raises(ValueError, match=name):
            fai.flash_attn_func(**_dense(), **{name: value})
    for name, value in [("q_descale", t)]:
        with pytest.raises(ValueError, match=name):
            fai.flash_attn_with_kvcache(**_kv(), **{name: value})
    with pytest.raises(ValueError, match="max_seqlen_q"):
        fai.flash_attn_with_kvcache(**_kv(), max_seqlen_q=1)
    with pytest.raises(ValueError, match="sinks"):
        fai.flash_attn_with_kvcache(**_kv(), sinks=torch.ones(3))  # [h] with h = 4


def test_bad_inputs_raise_errors_naming_the_argument():
    rng = rng_for("bad")
    q = make((2, 3, 4, 16), "fp32", "torch", rng)
    cases = [
        (ValueError, "q", _dense(q=make((2, 3, 4, 32), "fp32", "torch", rng)[..., ::2])),  # last dim strided
        (ValueError, "q", _dense(q=q[0])),  # wrong rank
        (ValueError, "k", _dense(k=make((2, 5, 3, 16), "fp32", "torch", rng), v=make((2, 5, 3, 16), "fp32", "torch", rng))),
        (ValueError, "k", _dense(k=make((2, 5, 2, 8), "fp32", "torch", rng))),  # head dim mismatch
        (ValueError, "v", _dense(v=make((2, 4, 2, 16), "fp32", "torch", rng))),  # length mismatch
        (TypeError, "q", _dense(q=torch.zeros(2, 3, 4, 16, dtype=torch.int32))),
        (TypeError, "q", _dense(q=torch.zeros(2, 3, 4, 16, dtype=torch.float64))),
        (TypeError, "k", _dense(k=make((2, 5, 2, 16), "bf16", "torch", rng))),  # dtype differs from q
        (TypeError, "k", _dense(k=make((2, 5, 2, 16), "fp32", "numpy", rng))),  # kind differs from q
        (ValueError, "window_size", _dense(window_size=(-2, 0))),
        (ValueError, "softcap", _dense(softcap=-1.0)),
    ]
    for exc, name, args in cases:
        with pytest.raises(exc, match=name):
            fai.flash_attn_func(**args)
    with pytest.raises(TypeError, match="q"):
        fai.flash_attn_func(q.numpy().astype(np.float64), q.numpy(), q.numpy())
    kv_cases = [
        (ValueError, "k, v", _kv(k=make((2, 1, 2, 16), "fp32", "torch", rng))),  # k without v
        (ValueError, "cache_seqlens", _kv(cache_seqlens=8, k=make((2, 1, 2, 16), "fp32", "torch", rng),
                                          v=make((2, 1, 2, 16), "fp32", "torch", rng))),  # above capacity
        (ValueError, "cache_seqlens", _kv(cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32))),
        (ValueError, "cache_seqlens", _kv(cache_seqlens=-1)),
        (ValueError, "cache_batch_idx", _kv(cache_batch_idx=torch.tensor([0, 5], dtype=torch.int32))),
        (ValueError, "page_table", _kv(page_table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32))),
        (ValueError, "cache_leftpad", _kv(cache_leftpad=torch.tensor([0, 4], dtype=torch.int32))),
        (ValueError, "k_cache", _kv(k_cache=make((2, 8, 3, 16), "fp32", "torch", rng),
                                    v_cache=make((2, 8, 3, 16), "fp32", "torch", rng))),
        (ValueError, "v_cache", _kv(v_cache=make((2, 7, 2, 16), "fp32", "torch", rng))),
        (ValueError, "k_cache", _kv(k_cache=make((2, 8, 2, 32), "fp32", "torch", rng)[..., ::2])),
        (ValueError, "cache_seqlens", _kv(cache_seqlens=None, k=make((2, 1, 2, 16), "fp32", "torch", rng),
                                          v=make((2, 1, 2, 16), "fp32", "torch", rng))),
        (ValueError, "rotary_cos", _kv(rotary_cos=torch.ones(8, 4))),
        (ValueError, "k", _kv(k=make((2, 1, 2, 8), "fp32", "torch", rng), v=make((2, 1, 2, 16), "fp32", "torch", rng))),
    ]
    for exc, name, args in kv_cases:
        with pytest.raises(exc, match=name):
            fai.flash_attn_with_kvcache(**args)
    # Paged: page_table rows must match b; pages past the used range are not checked.
    pc = make((4, 4, 2, 16), "fp32", "torch", rng)
    with pytest.raises(ValueError, match="page_table"):
        fai.flash_attn_with_kvcache(**_kv(k_cache=pc, v_cache=pc, page_table=torch.zeros(3, 2, dtype=torch.int32)))
    ok = fai.flash_attn_with_kvcache(**_kv(k_cache=pc, v_cache=pc, page_table=torch.tensor([[0, -1], [1, 99]], dtype=torch.int32)))
    assert torch.isfinite(ok).all()
    # varlen
    qv, kv = make((6, 4, 16), "fp32", "torch", rng), make((6, 2, 16), "fp32", "torch", rng)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        fai.flash_attn_varlen_func(qv, kv, kv, cu, torch.tensor([0, 3, 9], dtype=torch.int32), 3, 6)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        fai.flash_attn_varlen_func(qv, kv, kv, torch.tensor([0, 4, 2], dtype=torch.int32), cu, 4, 3)
    with pytest.raises(ValueError, match="seqused_k"):
        fai.flash_attn_varlen_func(qv, kv, kv, cu, cu, 3, 3, seqused_k=torch.tensor([1], dtype=torch.int32))
    # combine
    with pytest.raises(TypeError, match="out_partial"):
        fai.flash_attn_combine(torch.zeros(2, 1, 1, 1, 8, dtype=torch.float16), torch.zeros(2, 1, 1, 1))
    with pytest.raises(ValueError, match="lse_partial"):
        fai.flash_attn_combine(torch.zeros(2, 1, 1, 1, 8), torch.zeros(3, 1, 1, 1))
    with pytest.raises(ValueError, match="out"):
        fai.flash_attn_combine(torch.zeros(2, 1, 1, 1, 8), torch.zeros(2, 1, 1, 1), out=torch.zeros(1, 1, 1, 4))


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_kvcache_packed_queries_sinks_chunk_match_per_sequence_calls(kind):
    # FA3 chunked prefill: cu_seqlens_q / cu_seqlens_k_new pack each sequence's own query
    # rows and new keys; with sinks and attention_chunk the packed call must equal one
    # call per sequence (each checked against float64 elsewhere), outputs and caches.
    rng = rng_for("kv-packed", kind)
    h, h_k, d, cap = 4, 2, 16, 40
    nq, nn, seqlens = [2, 1, 3], [2, 0, 3], np.array([5, 20, 0], dtype=np.int32)
    b = len(nq)
    cu_q = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    cu_n = np.concatenate([[0], np.cumsum(nn)]).astype(np.int32)
    conv = (lambda a: a) if kind == "numpy" else torch.from_numpy
    copy = (lambda x: x.copy()) if kind == "numpy" else (lambda x: x.clone())
    q = make((int(cu_q[-1]), h, d), "fp32", kind, rng)
    kn, vn = make((int(cu_n[-1]), h_k, d), "fp32", kind, rng), make((int(cu_n[-1]), h_k, d), "fp32", kind, rng)
    kc0, vc0 = make((b, cap, h_k, d), "fp32", kind, rng), make((b, cap, h_k, d), "fp32", kind, rng)
    sinks = conv(np.linspace(-1.0, 1.5, h).astype(np.float32))
    kc, vc = copy(kc0), copy(vc0)
    out, lse, *_ = fai.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=conv(seqlens), causal=True,
                                               cu_seqlens_q=conv(cu_q), max_seqlen_q=3,
                                               cu_seqlens_k_new=conv(cu_n), sinks=sinks, attention_chunk=4,
                                               return_softmax_lse=True)
    assert tuple(out.shape) == (int(cu_q[-1]), h, d) and tuple(lse.shape) == (h, int(cu_q[-1]))
    for s in range(b):
        kc1, vc1 = copy(kc0[s:s + 1]), copy(vc0[s:s + 1])
        qs = q[cu_q[s]:cu_q[s + 1]][None]
        ks = kn[cu_n[s]:cu_n[s + 1]][None] if nn[s] else None
        vs = vn[cu_n[s]:cu_n[s + 1]][None] if nn[s] else None
        o1, l1, *_ = fai.flash_attn_with_kvcache(qs, kc1, vc1, ks, vs, cache_seqlens=int(seqlens[s]),
                                                 causal=True, sinks=sinks, attention_chunk=4,
                                                 return_softmax_lse=True)
        assert np.abs(f64(out[cu_q[s]:cu_q[s + 1]]) - f64(o1[0])).max() <= 1e-5
        assert np.abs(f64(lse[:, cu_q[s]:cu_q[s + 1]]) - f64(l1[0])).max() <= 1e-5
        assert np.array_equal(f64(kc[s:s + 1]), f64(kc1)) and np.array_equal(f64(vc[s:s + 1]), f64(vc1))
    # And against float64: each sequence's rows over its cached keys and new keys.
    for s in range(b):
        keys = np.concatenate([f64(kc0[s, :seqlens[s]]), f64(kn[cu_n[s]:cu_n[s + 1]])])
        vals = np.concatenate([f64(vc0[s, :seqlens[s]]), f64(vn[cu_n[s]:cu_n[s + 1]])])
        ro, rl = ref_attention(f64(q[cu_q[s]:cu_q[s + 1]]), keys, vals, causal=True, sinks=f64(sinks), chunk=4)
        assert np.abs(f64(out[cu_q[s]:cu_q[s + 1]]) - ro).max() <= 1e-5
        assert np.abs(f64(lse[:, cu_q[s]:cu_q[s + 1]]) - rl).max() <= 1e-5
