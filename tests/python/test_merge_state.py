"""ringattn.merge_state / merge_states against a float64 reference (docs/semantics.md section 5).

States are (v, s) with s the natural-log LSE; -inf and +inf both mean "empty" (FA3 writes
-inf, FlashMLA / FA2 +inf). Covers torch and numpy, fp32 / fp16 / bf16 v, non-contiguous
inputs, empty states and zero-size tensors.
"""

import numpy as np
import pytest
import torch

import ringattn


def ref_merge(vs, ss):
    """float64 merge of states vs [k][seq, h, d], ss [k][seq, h] (+inf counts as empty)."""
    v = np.stack([np.asarray(x, np.float64) for x in vs])  # [k, seq, h, d]
    s = np.stack([np.asarray(x, np.float64) for x in ss])  # [k, seq, h]
    s = np.where(np.isposinf(s), -np.inf, s)
    m = s.max(axis=0)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    w = np.exp(s - m_safe)  # 0 for empty states
    tot = w.sum(axis=0)
    with np.errstate(divide="ignore"):
        lse = np.where(tot > 0, np.log(np.where(tot > 0, tot, 1.0)) + m_safe, -np.inf)
    out = (w[..., None] * v).sum(axis=0) / np.where(tot > 0, tot, 1.0)[..., None]
    return out, lse


def as_f64(x):
    return x.detach().to(torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


def lse_close(got, want, rtol=1e-5):
    got, want = as_f64(got), as_f64(want)
    assert (np.isneginf(got) == np.isneginf(want)).all(), f"-inf pattern differs: {got} vs {want}"
    fin = np.isfinite(want)
    assert np.isfinite(got[fin]).all()
    np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=1e-6)


def make_states(rng, k, seq, h, d, empty_frac=0.25):
    vs = [rng.standard_normal((seq, h, d)).astype(np.float32) for _ in range(k)]
    ss = []
    for _ in range(k):
        s = (rng.standard_normal((seq, h)) * 4).astype(np.float32)
        u = rng.random((seq, h))
        s[u < empty_frac / 2] = -np.inf
        s[(u >= empty_frac / 2) & (u < empty_frac)] = np.inf
        ss.append(s)
    return vs, ss


def to_kind(x, kind, dtype=None):
    if kind == "torch":
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t if dtype is None else t.to(dtype)
    return x if dtype is None else x.astype(dtype)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("seq,h,d", [(1, 1, 1), (7, 3, 64), (33, 4, 128), (5, 2, 17)])
def test_merge_state_fp32(kind, seq, h, d):
    rng = np.random.default_rng(seq * 1000 + h * 10 + d)
    (va, vb), (sa, sb) = make_states(rng, 2, seq, h, d)
    v, s = ringattn.merge_state(to_kind(va, kind), to_kind(sa, kind), to_kind(vb, kind), to_kind(sb, kind))
    ro, rl = ref_merge([va, vb], [sa, sb])
    assert type(v) is type(to_kind(va, kind)) and tuple(v.shape) == (seq, h, d) and tuple(s.shape) == (seq, h)
    assert str(s.dtype).endswith("float32")
    np.testing.assert_allclose(as_f64(v), ro, rtol=1e-5, atol=1e-5)
    lse_close(s, rl)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_merge_state_empty_states(kind):
    # Every combination of empty (-inf / +inf) and finite states, row by row.
    vals = [-np.inf, np.inf, 0.0, 3.5, -80.0]
    pairs = [(a, b) for a in vals for b in vals]
    sa = np.array([[a for a, _ in pairs]], np.float32)
    sb = np.array([[b for _, b in pairs]], np.float32)
    va = np.full((1, len(pairs), 4), 1.0, np.float32)
    vb = np.full((1, len(pairs), 4), 2.0, np.float32)
    v, s = ringattn.merge_state(to_kind(va, kind), to_kind(sa, kind), to_kind(vb, kind), to_kind(sb, kind))
    ro, rl = ref_merge([va, vb], [sa, sb])
    assert not np.isnan(as_f64(v)).any() and not np.isnan(as_f64(s)).any()
    np.testing.assert_allclose(as_f64(v), ro, rtol=1e-6, atol=1e-6)
    lse_close(s, rl)
    both_empty = np.isinf(sa[0]) & np.isinf(sb[0])
    assert (as_f64(v)[0][both_empty] == 0).all()
    assert np.isneginf(as_f64(s)[0][both_empty]).all()


def test_merge_state_bf16_v():
    rng = np.random.default_rng(5)
    (va, vb), (sa, sb) = make_states(rng, 2, 9, 3, 32)
    ta, tb = torch.from_numpy(va).to(torch.bfloat16), torch.from_numpy(vb).to(torch.bfloat16)
    v, s = ringattn.merge_state(ta, torch.from_numpy(sa), tb, torch.from_numpy(sb))
    assert v.dtype == torch.bfloat16 and s.dtype == torch.float32
    ro, rl = ref_merge([as_f64(ta), as_f64(tb)], [sa, sb])  # reference on the rounded inputs
    np.testing.assert_allclose(as_f64(v), ro, rtol=1e-2, atol=1e-2)  # one bf16 rounding of the output
    lse_close(s, rl)


def test_merge_state_fp16_numpy_and_noncontiguous():
    rng = np.random.default_rng(6)
    (va, vb), (sa, sb) = make_states(rng, 2, 6, 4, 16)
    big_a = np.zeros((6, 4, 32), np.float16)
    big_a[:, :, ::2] = va  # a strided view: every other element of the last dim
    v, s = ringattn.merge_state(big_a[:, :, ::2], sa.T.copy().T, vb.astype(np.float16), sb)
    assert v.dtype == np.float16
    ro, rl = ref_merge([va.astype(np.float16), vb.astype(np.float16)], [sa, sb])
    np.testing.assert_allclose(as_f64(v), ro, rtol=2e-3, atol=2e-3)
    lse_close(s, rl)
    # torch: a transposed (non-contiguous) LSE.
    st = torch.from_numpy(sa.T.copy()).T
    assert not st.is_contiguous()
    v2, s2 = ringattn.merge_state(torch.from_numpy(va), st, torch.from_numpy(vb), torch.from_numpy(sb))
    ro, rl = ref_merge([va, vb], [sa, sb])
    np.testing.assert_allclose(as_f64(v2), ro, rtol=1e-5, atol=1e-5)
    lse_close(s2, rl)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_merge_states(kind, n):
    rng = np.random.default_rng(100 + n)
    seq, h, d = 11, 3, 40
    vs, ss = make_states(rng, n, seq, h, d, empty_frac=0.4)
    v = np.stack(vs, axis=1)  # [seq, n, h, d]
    s = np.stack(ss, axis=1)  # [seq, n, h]
    vo, so = ringattn.merge_states(to_kind(v, kind), to_kind(s, kind))
    ro, rl = ref_merge(vs, ss)
    assert tuple(vo.shape) == (seq, h, d) and tuple(so.shape) == (seq, h)
    assert not np.isnan(as_f64(vo)).any()
    np.testing.assert_allclose(as_f64(vo), ro, rtol=1e-5, atol=1e-5)
    lse_close(so, rl)


def test_merge_states_all_empty_and_bf16():
    s = torch.tensor([[[-np.inf, np.inf], [np.inf, np.inf]]], dtype=torch.float32)  # [1, 2, 2]
    v = torch.randn(1, 2, 2, 8).to(torch.bfloat16)
    vo, so = ringattn.merge_states(v, s)
    assert vo.dtype == torch.bfloat16
    assert (vo.float() == 0).all() and torch.isneginf(so).all()
    # bf16 values, finite LSEs.
    rng = np.random.default_rng(7)
    vs, ss = make_states(rng, 4, 5, 2, 16, empty_frac=0.0)
    vt = torch.from_numpy(np.stack(vs, axis=1)).to(torch.bfloat16)
    vo, so = ringattn.merge_states(vt, torch.from_numpy(np.stack(ss, axis=1)))
    ro, rl = ref_merge([as_f64(vt[:, i]) for i in range(4)], ss)
    np.testing.assert_allclose(as_f64(vo), ro, rtol=1e-2, atol=1e-2)
    lse_close(so, rl)


def test_merge_states_matches_pairwise():
    # The merge is associative: folding merge_state pairwise equals merge_states.
    rng = np.random.default_rng(8)
    vs, ss = make_states(rng, 4, 6, 2, 8)
    v, s = vs[0], ss[0]
    for i in range(1, 4):
        v, s = ringattn.merge_state(v, s, vs[i], ss[i])
    vo, so = ringattn.merge_states(np.stack(vs, axis=1), np.stack(ss, axis=1))
    np.testing.assert_allclose(v, vo, rtol=1e-5, atol=1e-5)
    lse_close(s, so)


def test_zero_sizes():
    z = np.zeros((0, 3, 4), np.float32)
    v, s = ringattn.merge_state(z, np.zeros((0, 3), np.float32), z, np.zeros((0, 3), np.float32))
    assert v.shape == (0, 3, 4) and s.shape == (0, 3)
    # d = 0: the LSEs still merge.
    e = np.zeros((2, 3, 0), np.float32)
    v, s = ringattn.merge_state(e, np.zeros((2, 3), np.float32), e, np.full((2, 3), -np.inf, np.float32))
    assert v.shape == (2, 3, 0)
    np.testing.assert_allclose(s, 0.0)
    # No states at all: every row is empty.
    vo, so = ringattn.merge_states(torch.zeros(2, 0, 3, 4), torch.zeros(2, 0, 3))
    assert tuple(vo.shape) == (2, 3, 4) and (vo == 0).all() and torch.isneginf(so).all()
    vo, so = ringattn.merge_states(np.zeros((0, 2, 3, 4), np.float32), np.zeros((0, 2, 3), np.float32))
    assert vo.shape == (0, 3, 4) and so.shape == (0, 3)


def test_errors():
    v = np.zeros((2, 3, 4), np.float32)
    s = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="v_b: shape"):
        ringattn.merge_state(v, s, np.zeros((2, 3, 5), np.float32), s)
    with pytest.raises(ValueError, match="s_b: shape"):
        ringattn.merge_state(v, s, v, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="s_a: expected 2 dims"):
        ringattn.merge_state(v, v, v, s)
    with pytest.raises(TypeError, match="s_a"):
        ringattn.merge_state(v, np.zeros((2, 3), np.int32), v, s)
    with pytest.raises(TypeError, match="kind|torch|numpy"):
        ringattn.merge_state(v, torch.zeros(2, 3), v, s)
    with pytest.raises(ValueError, match=r"s: shape"):
        ringattn.merge_states(np.zeros((2, 3, 4, 5), np.float32), np.zeros((2, 4, 3), np.float32))
    with pytest.raises(ValueError, match="4 dims"):
        ringattn.merge_states(v, s)
