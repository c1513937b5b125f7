"""FA3's ``qv`` argument (docs/semantics.md section 7) of flash_attn_func,
flash_attn_varlen_func and flash_attn_with_kvcache against a float64 NumPy reference:
score = softmax_scale * (q . k + qv . v), default scale 1/sqrt(d + d_v). Shapes are drawn
fresh each run from a printed seed; replay a failure with RINGATTN_TEST_SEED=<seed>."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ringattn import flash_attn_interface as fai  # noqa: E402
from test_flash_attn_interface import SEED, check, f64, make, random_mask, rng_for  # noqa: E402
from test_flash_attn_interface import ref_attention as _ref  # noqa: E402

KINDS = [("torch", "fp32"), ("torch", "bf16"), ("numpy", "fp32"), ("numpy", "fp16")]
HEADS = [(6, 6), (6, 2), (6, 1)]
DIMS = [(64, 256), (64, 128), (16, 24), (32, 64)]


def ref_attention(q, k, v, qv, scale=None, causal=False, window=(-1, -1), softcap=0.0):
    """The float64 reference of test_flash_attn_interface with qv [s_q, h, d_v]."""
    return _ref(q, k, v, scale, causal, window, softcap, qv=qv)


@pytest.mark.parametrize("kind,typ", KINDS)
def test_dense_qv_against_reference(kind, typ):
    rng = rng_for("dense", kind, typ)
    for trial in range(8):
        b = int(rng.integers(1, 3))
        s_q, s_k = [(1, 1), (1, 70), (3, 1), (13, 29), (29, 13), (80, 150), (2, 300)][int(rng.integers(7))]
        h, h_k = HEADS[int(rng.integers(len(HEADS)))]
        d, d_v = DIMS[int(rng.integers(len(DIMS)))]
        causal, window, softcap = random_mask(rng)
        scale = None if rng.integers(2) else float(rng.uniform(0.05, 0.3))
        q, k = make((b, s_q, h, d), typ, kind, rng), make((b, s_k, h_k, d), typ, kind, rng)
        v, qv = make((b, s_k, h_k, d_v), typ, kind, rng), make((b, s_q, h, d_v), typ, kind, rng)
        out, lse = fai.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, qv=qv,
                                       window_size=window, softcap=softcap, return_attn_probs=True)
        assert type(out) is type(q) and out.dtype == q.dtype
        what = f"dense trial {trial} b={b} {s_q}x{s_k} h=({h},{h_k}) d=({d},{d_v}) mask={causal, window, softcap}"
        for i in range(b):
            ro, rl = ref_attention(f64(q[i]), f64(k[i]), f64(v[i]), f64(qv[i]), scale, causal, window, softcap)
            check(out[i], ro, typ, what + f" out[{i}]")
            check(lse[i], rl, typ, what + f" lse[{i}]", lse=True)


@pytest.mark.parametrize("kind,typ", KINDS)
def test_varlen_qv_against_reference(kind, typ):
    rng = rng_for("varlen", kind, typ)
    for trial in range(4):
        b = int(rng.integers(1, 4))
        lq = rng.integers(0, 20, size=b)
        lk = rng.integers(0, 60, size=b)
        h, h_k = HEADS[int(rng.integers(len(HEADS)))]
        d, d_v = DIMS[int(rng.integers(len(DIMS)))]
        causal, window, softcap = random_mask(rng)
        cq = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
        ck = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
        tq, tk = int(cq[-1]), int(ck[-1])
        q, k = make((tq, h, d), typ, kind, rng), make((tk, h_k, d), typ, kind, rng)
        v, qv = make((tk, h_k, d_v), typ, kind, rng), make((tq, h, d_v), typ, kind, rng)
        conv = (lambda a: a) if kind == "numpy" else torch.from_numpy
        out, lse = fai.flash_attn_varlen_func(q, k, v, conv(cq), conv(ck), None, None, causal=causal,
                                              qv=qv, window_size=window, softcap=softcap,
                                              return_attn_probs=True)
        what = f"varlen trial {trial} lq={lq} lk={lk} h=({h},{h_k}) d=({d},{d_v}) mask={causal, window, softcap}"
        for i in range(b):
            a, e, ka, ke = int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])
            ro, rl = ref_attention(f64(q[a:e]), f64(k[ka:ke]), f64(v[ka:ke]), f64(qv[a:e]), None, causal,
                                   window, softcap)
            check(out[a:e], ro, typ, what + f" out seq {i}")
            check(lse[:, a:e], rl, typ, what + f" lse seq {i}", lse=True)


@pytest.mark.parametrize("page_size", [None, 1, 16])
@pytest.mark.parametrize("kind,typ", [("torch", "fp32"), ("torch", "bf16"), ("numpy", "fp32")])
def test_kvcache_qv_against_reference(page_size, kind, typ):
    """Paged / dense cache, appended k/v, leftpad; unused cache slots hold NaN."""
    rng = rng_for("kvcache", page_size, kind, typ)
    for trial in range(3):
        b = int(rng.integers(1, 4))
        s_q = int(rng.integers(1, 5))
        s_new = int(rng.integers(0, 4))
        h, h_k = HEADS[int(rng.integers(len(HEADS)))]
        d, d_v = DIMS[int(rng.integers(len(DIMS)))]
        causal, window, softcap = random_mask(rng)
        capacity = int(rng.integers(s_new + 1, 80))
        seqlens = rng.integers(0, capacity - s_new + 1, size=b).astype(np.int32)
        leftpad = (rng.integers(0, seqlens + 1)).astype(np.int32) if rng.integers(2) else None
        if page_size is None:
            shape_k, shape_v, page_table = (b, capacity, h_k, d), (b, capacity, h_k, d_v), None
        else:
            max_pages = -(-capacity // page_size)
            nb = b * max_pages + 2
            page_table = rng.permutation(nb)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
            shape_k, shape_v = (nb, page_size, h_k, d), (nb, page_size, h_k, d_v)
        k_cache, v_cache = make(shape_k, typ, kind, rng), make(shape_v, typ, kind, rng)
        k_cache[...] = np.nan
        v_cache[...] = np.nan
        k_fill = make((b, capacity, h_k, d), typ, kind, rng)
        v_fill = make((b, capacity, h_k, d_v), typ, kind, rng)
        for i in range(b):
            lo, hi = int(leftpad[i]) if leftpad is not None else 0, int(seqlens[i])
            for t in range(lo, hi):
                if page_table is None:
                    k_cache[i, t], v_cache[i, t] = k_fill[i, t], v_fill[i, t]
                else:
                    blk, off = int(page_table[i, t // page_size]), t % page_size
                    k_cache[blk, off], v_cache[blk, off] = k_fill[i, t], v_fill[i, t]
        q, qv = make((b, s_q, h, d), typ, kind, rng), make((b, s_q, h, d_v), typ, kind, rng)
        k_new = make((b, s_new, h_k, d), typ, kind, rng) if s_new else None
        v_new = make((b, s_new, h_k, d_v), typ, kind, rng) if s_new else None
        conv = (lambda a: a) if kind == "numpy" else (lambda a: None if a is None else torch.from_numpy(a))
        out, lse, _, _ = fai.flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k_new, v=v_new, qv=qv, cache_seqlens=conv(seqlens),
            cache_leftpad=conv(leftpad), page_table=conv(page_table), causal=causal, window_size=window,
            softcap=softcap, return_softmax_lse=True)
        what = (f"kvcache trial {trial} page={page_size} b={b} s_q={s_q} s_new={s_new} h=({h},{h_k}) "
                f"d=({d},{d_v}) seqlens={seqlens} leftpad={leftpad} mask={causal, window, softcap}")
        for i in range(b):
            lo, c = int(leftpad[i]) if leftpad is not None else 0, int(seqlens[i])
            keys, vals = f64(k_fill[i, lo:c]), f64(v_fill[i, lo:c])
            if s_new:
                keys = np.concatenate([keys, f64(k_new[i])])
                vals = np.concatenate([vals, f64(v_new[i])])
            ro, rl = ref_attention(f64(q[i]), keys, vals, f64(qv[i]), None, causal, window, softcap)
            check(out[i], ro, typ, what + f" out[{i}]")
            check(lse[i], rl, typ, what + f" lse[{i}]", lse=True)


def test_default_scale_counts_qv_dims():
    rng = rng_for("scale")
    q, k = make((2, 7, 4, 64), "fp32", "torch", rng), make((2, 30, 2, 64), "fp32", "torch", rng)
    v, qv = make((2, 30, 2, 128), "fp32", "torch", rng), make((2, 7, 4, 128), "fp32", "torch", rng)
    a = fai.flash_attn_func(q, k, v, qv=qv)
    b = fai.flash_attn_func(q, k, v, qv=qv, softmax_scale=1.0 / math.sqrt(64 + 128))
    assert torch.equal(a, b)
    c = fai.flash_attn_func(q, k, v, qv=qv, softmax_scale=1.0 / math.sqrt(64))
    assert not torch.allclose(a, c)


def test_qv_bad_inputs_name_the_argument():
    rng = rng_for("bad")
    q, k = make((2, 3, 4, 16), "fp32", "torch", rng), make((2, 5, 2, 16), "fp32", "torch", rng)
    v = make((2, 5, 2, 32), "fp32", "torch", rng)
    # Shape mismatch names both shapes.
    with pytest.raises(ValueError, match=r"qv: shape \[2, 3, 4, 16\] must equal \[b, s_q, h, d_v\] = \[2, 3, 4, 32\]"):
        fai.flash_attn_func(q, k, v, qv=make((2, 3, 4, 16), "fp32", "torch", rng))
    with pytest.raises(TypeError, match="qv: dtype bf16 must equal q's fp32"):
        fai.flash_attn_func(q, k, v, qv=make((2, 3, 4, 32), "bf16", "torch", rng))
    with pytest.raises(TypeError, match="qv"):
        fai.flash_attn_func(q, k, v, qv=make((2, 3, 4, 32), "fp32", "numpy", rng))
    # FA3's MLA shape: d_v = 512 names the limit and the MLA path.
    v512 = make((2, 5, 2, 512), "fp32", "torch", rng)
    with pytest.raises(ValueError, match=r"qv: d_v=512 exceeds 256.*flash_mla_interface"):
        fai.flash_attn_func(q, k, v512, qv=make((2, 3, 4, 512), "fp32", "torch", rng))
    cq = torch.tensor([0, 3], dtype=torch.int32)
    ck = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"qv: shape \[3, 4, 16\] must equal \[total_q, h, d_v\]"):
        fai.flash_attn_varlen_func(q[0], k[0], v[0], cq, ck, 3, 5, qv=make((3, 4, 16), "fp32", "torch", rng))
    kc, vc = make((2, 8, 2, 16), "fp32", "torch", rng), make((2, 8, 2, 32), "fp32", "torch", rng)
    with pytest.raises(ValueError, match=r"qv: shape \[2, 3, 4, 16\]"):
        fai.flash_attn_with_kvcache(q, kc, vc, qv=make((2, 3, 4, 16), "fp32", "torch", rng), cache_seqlens=4)
    # fp8 (uint8 e4m3 bits) storage does not take qv.
    q8, k8 = torch.randint(0, 100, (1, 3, 2, 16), dtype=torch.uint8), torch.randint(0, 100, (1, 5, 2, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match="qv: not supported with fp8"):
        fai.flash_attn_func(q8, k8, k8, qv=torch.randint(0, 100, (1, 3, 2, 16), dtype=torch.uint8))


@pytest.mark.parametrize("kind,typ", [("torch", "fp32"), ("numpy", "fp32"), ("torch", "bf16")])
def test_kvcache_packed_queries_with_qv_match_per_sequence_calls(kind, typ):
    """cu_seqlens_q packs each sequence's query rows and its qv rows ([total_q, h, d_v]);
    the result equals one call per sequence (chunked prefill, causal, GQA)."""
    rng = rng_for("kv-packed", kind, typ)
    h, h_k, d, d_v, cap = 6, 2, 32, 64, 40
    q_lens, seqlens = [3, 0, 5], np.array([7, 12, 0], np.int32)
    b = len(q_lens)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    k_cache, v_cache = make((b, cap, h_k, d), typ, kind, rng), make((b, cap, h_k, d_v), typ, kind, rng)
    q, qv = make((int(cu[-1]), h, d), typ, kind, rng), make((int(cu[-1]), h, d_v), typ, kind, rng)
    conv = (lambda a: a) if kind == "numpy" else torch.from_numpy
    out = fai.flash_attn_with_kvcache(q, k_cache, v_cache, qv=qv, cache_seqlens=conv(seqlens),
                                      cu_seqlens_q=conv(cu), max_seqlen_q=max(q_lens), causal=True)
    for i in range(b):
        a, e = int(cu[i]), int(cu[i + 1])
        if a == e:
            continue
        ro, _ = ref_attention(f64(q[a:e]), f64(k_cache[i, : seqlens[i]]), f64(v_cache[i, : seqlens[i]]),
                              f64(qv[a:e]), None, True)
        check(out[a:e], ro, typ, f"packed kvcache qv seq {i}")
