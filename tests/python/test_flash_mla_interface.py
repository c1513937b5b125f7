"""ringattn.flash_mla_interface against a float64 NumPy reference written here.

Shapes are drawn fresh on every run (the seed is printed; RINGATTN_TEST_SEED replays a
run). Unused cache slots hold NaN, so reading one shows up as NaN in the output. The
fp8 cache is packed exactly like FlashMLA's tests/quant.py does it (per 128-value tile,
power-of-two scale = 2^ceil(log2(amax / 448)), e4m3 values, bf16 rope).
"""

import math
import os

import numpy as np
import pytest
import torch

import ringattn
from ringattn import flash_mla_interface as fm

D, DV = 576, 512

SEED = int(os.environ.get("RINGATTN_TEST_SEED", np.random.SeedSequence().entropy % (2**32)))
print(f"test_flash_mla_interface seed {SEED} (replay with RINGATTN_TEST_SEED={SEED})")


@pytest.fixture
def rng(request):
    # One stream per test, derived from the run's seed and the test's name.
    return np.random.default_rng([SEED, sum(map(ord, request.node.name))])


# ---- helpers: rounding, fp8 packing, reference ----


def bf16_round(x):
    """float64 -> nearest bf16 value (as float64), round half to even."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32).astype(np.float64)


def bf16_bits(x):
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def _e4m3_table():
    codes = np.arange(256)
    e, m, s = (codes >> 3) & 0xF, codes & 7, np.where(codes & 0x80, -1.0, 1.0)
    v = s * np.where(e == 0, m / 8.0 * 2.0**-6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    v[(codes & 0x7F) == 0x7F] = np.nan
    return v


E4M3 = _e4m3_table()
_POS_CODES = np.argsort(E4M3[:127])  # codes 0..126 are the non-negative finite values
_POS_VALS = E4M3[:127][_POS_CODES]


def to_e4m3(x):
    """Nearest e4m3 code of each value (|x| <= 448)."""
    a = np.abs(x)
    i = np.clip(np.searchsorted(_POS_VALS, a), 1, len(_POS_VALS) - 1)
    lo, hi = _POS_VALS[i - 1], _POS_VALS[i]
    code = _POS_CODES[np.where(a - lo <= hi - a, i - 1, i)]
    return (code | np.where(x < 0, 0x80, 0)).astype(np.uint8)


def quantize_fp8(cache):
    """[nb, page, 1, 576] float64 (NaN rows allowed) -> ([nb, page, 1, 656] uint8, the
    dequantised values [nb, page, 1, 576] the kernel must see)."""
    nb, page = cache.shape[:2]
    flat = cache.reshape(-1, D)
    packed = np.zeros((flat.shape[0], 656), np.uint8)
    deq = np.empty_like(flat)
    for t in range(4):
        tile = flat[:, 128 * t : 128 * (t + 1)]
        amax = np.nan_to_num(np.abs(tile).max(axis=1), nan=1.0)
        sc = np.power(2.0, np.ceil(np.log2(np.maximum(amax / 448.0, 1e-4)))).astype(np.float32)
        codes = to_e4m3(np.nan_to_num(tile / sc[:, None]))
        packed[:, 128 * t : 128 * (t + 1)] = codes
        packed[:, 512 + 4 * t : 516 + 4 * t] = sc.view(np.uint8).reshape(-1, 4)
        deq[:, 128 * t : 128 * (t + 1)] = E4M3[codes] * sc[:, None].astype(np.float64)
    rope = np.nan_to_num(flat[:, 512:])
    packed[:, 528:] = bf16_bits(rope).view(np.uint8).reshape(-1, 128)
    deq[:, 512:] = bf16_round(rope)
    deq[np.isnan(flat).any(axis=1)] = np.nan
    return packed.reshape(nb, page, 1, 656), deq.reshape(nb, page, 1, D)


def ref_rows(q, kv, keys, scale, sink):
    """One query token: q [h, 576], kv [slots, 576] float64, keys = slot list.
    Returns out [h, 512], lse [h] (+inf when empty), max_logits [h] (-inf when empty)."""
    h = q.shape[0]
    if len(keys) == 0:
        return np.zeros((h, DV)), np.full(h, np.inf), np.full(h, -np.inf)
    k = kv[np.asarray(keys)]
    s = scale * (q @ k.T)
    mx = s.max(axis=1)
    p = np.exp(s - mx[:, None])
    lse = mx + np.log(p.sum(axis=1))
    out = (p / p.sum(axis=1, keepdims=True)) @ k[:, :DV]
    if sink is not None:
        out = out / (1.0 + np.exp(sink[:, None] - lse[:, None]))
    return out, lse, mx


def make_paged(rng, lens, page, extra_blocks=2):
    """Random cache for sequences of lengths `lens`: (values [nb, page, 1, 576] with NaN
    in every slot no sequence owns, block_table [b, max_blocks], slots of sequence i)."""
    b = len(lens)
    per = [max(1, -(-L // page)) for L in lens]
    max_blocks = max(per) + 1
    nb = sum(per) + extra_blocks
    perm = rng.permutation(nb)
    cache = np.full((nb, page, 1, D), np.nan)
    table = np.full((b, max_blocks), 2147480000, np.int64)  # FlashMLA's filler for unused entries
    slots, used = [], 0
    for i, L in enumerate(lens):
        blocks = perm[used : used + per[i]]
        used += per[i]
        table[i, : per[i]] = blocks
        sl = [int(blocks[j // page]) * page + j % page for j in range(L)]
        slots.append(sl)
        for s in sl:
            cache[s // page, s % page, 0] = rng.uniform(-1, 1, D)
    return cache, table, slots


def check(name, got, want, atol, rtol):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
    inf = np.isinf(want)
    assert np.array_equal(np.isinf(got) & (np.sign(got) == np.sign(want)), inf), f"{name}: infinities differ"
    fin = ~inf
    assert not np.isnan(got[fin]).any(), f"{name}: NaN in result"
    err = np.abs(got[fin] - want[fin])
    bound = atol + rtol * np.abs(want[fin])
    assert (err <= bound).all(), f"{name}: max err {err.max():.3g} (seed {SEED})"


def as_np(x):
    return x.float().numpy().astype(np.float64) if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


# ---- dense decode ----


def run_dense(rng, b, s_q, h, page, causal, lens, use_torch, bf16, fp8, scale, sink):
    cache, table, slots = make_paged(rng, lens, page)
    q = rng.uniform(-1, 1, (b, s_q, h, D))
    if bf16:
        q = bf16_round(q)
    if fp8:
        cache_in, cache_val = quantize_fp8(cache)
    else:
        cache_val = bf16_round(cache) if bf16 else cache.astype(np.float32).astype(np.float64)
        cache_in = cache_val.astype(np.float32)
    q_in = q.astype(np.float32)
    if use_torch:
        q_in, cache_in = torch.from_numpy(q_in), torch.from_numpy(cache_in)
        table_in, lens_in = torch.from_numpy(table.astype(np.int32)), torch.tensor(lens, dtype=torch.int32)
        if bf16:
            q_in = q_in.bfloat16()
            if not fp8:
                cache_in = cache_in.bfloat16()
    else:
        table_in, lens_in = table, np.asarray(lens, np.int64)
    sink_in = None if sink is None else (torch.from_numpy(sink.astype(np.float32)) if use_torch else sink.astype(np.float32))
    meta, _ = fm.get_mla_metadata()
    out, lse = fm.flash_mla_with_kvcache(q_in, cache_in, table_in, lens_in, 512, meta,
                                         softmax_scale=scale, causal=causal, is_fp8_kvcache=fp8,
                                         attn_sink=sink_in)
    assert tuple(out.shape) == (b, s_q, h, DV) and tuple(lse.shape) == (b, h, s_q)
    if use_torch:
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32) and lse.dtype == torch.float32
    kv = cache_val.reshape(-1, D)
    sc = scale if scale is not None else D**-0.5
    want_o, want_l = np.zeros((b, s_q, h, DV)), np.zeros((b, h, s_q))
    for i in range(b):
        for s in range(s_q):
            n = lens[i] - s_q + s + 1 if causal else lens[i]
            o, l, _ = ref_rows(q[i, s], kv, slots[i][: max(n, 0)], sc, sink)
            want_o[i, s], want_l[i, :, s] = o, l
    tol = 1e-2 if bf16 else 2e-5
    check("out", as_np(out), want_o, tol, tol)
    check("softmax_lse", as_np(lse), want_l, 1e-5, 1e-5)
    # The filled scheduling metadata gives the same result on a second call.
    out2, lse2 = fm.flash_mla_with_kvcache(q_in, cache_in, table_in, lens_in, 512, meta,
                                           softmax_scale=scale, causal=causal, is_fp8_kvcache=fp8,
                                           attn_sink=sink_in)
    assert meta.have_initialized and meta.tile_scheduler_metadata is not None
    check("out (reused metadata)", as_np(out2), as_np(out), 1e-6, 1e-6)


def test_dense_random_grid(rng):
    for case in range(8):
        b, s_q = int(rng.choice([1, 2, 3])), int(rng.choice([1, 2]))
        h, page = int(rng.choice([1, 16, 64])), int(rng.choice([1, 16, 64]))
        causal = bool(rng.integers(2))
        lens = [int(rng.choice([0, 1, 2, 5, 17, 64, 130, 300])) for _ in range(b)]
        use_torch, bf16 = case % 2 == 1, case % 4 == 3
        scale = None if case % 3 else 1 / math.sqrt(192)
        run_dense(rng, b, s_q, h, page, causal, lens, use_torch, bf16, False, scale, None)


def test_dense_causal_mtp_short_cache(rng):
    # s_q = 2 with one cached token: the first query token sees nothing (0 / +inf).
    run_dense(rng, 2, 2, 16, 16, True, [1, 40], False, False, False, None, None)


def test_dense_fp8_cache(rng):
    run_dense(rng, 2, 2, 16, 64, True, [70, 130], False, False, True, None, None)
    run_dense(rng, 1, 1, 64, 16, False, [33], True, True, True, None, None)


def test_dense_attn_sink(rng):
    sink = np.array([np.inf, -np.inf] + list(rng.uniform(-2, 3, 14)))
    run_dense(rng, 2, 1, 16, 16, False, [50, 0], False, False, False, None, sink)


# ---- sparse decode ----


def test_sparse_decode(rng):
    b, s_q, h, page, topk = 2, 2, 16, 16, 40
    for fp8 in (True, False):
        cache, table, slots = make_paged(rng, [200, 150], page)
        if fp8:
            cache_in, cache_val = quantize_fp8(cache)
        else:
            cache_val = cache.astype(np.float32).astype(np.float64)
            cache_in = cache_val.astype(np.float32)
        n_slots = cache.shape[0] * page
        q = rng.uniform(-1, 1, (b, s_q, h, D))
        idx = np.full((b, s_q, topk), -1, np.int64)
        for i in range(b):
            for s in range(s_q):
                k = int(rng.integers(1, topk + 1))
                idx[i, s, :k] = rng.choice(slots[i], k, replace=False)
                # Out-of-range entries act as padding and are never read.
                idx[i, s, rng.integers(0, topk)] = n_slots + int(rng.integers(0, 5))
        idx[1, 1, :] = -1  # a row with no valid key
        idx[0, 0, 3] = -7
        topk_length = np.array([topk, int(rng.integers(0, topk))])
        sink = np.array([np.inf, -np.inf] + list(rng.uniform(-2, 3, h - 2)))
        meta, _ = fm.get_mla_metadata()
        out, lse = fm.flash_mla_with_kvcache(torch.from_numpy(q.astype(np.float32)), torch.from_numpy(cache_in),
                                             None, None, 512, meta, is_fp8_kvcache=fp8,
                                             indices=torch.from_numpy(idx), attn_sink=torch.from_numpy(sink.astype(np.float32)),
                                             topk_length=torch.from_numpy(topk_length.astype(np.int32)))
        kv = cache_val.reshape(-1, D)
        want_o, want_l = np.zeros((b, s_q, h, DV)), np.zeros((b, h, s_q))
        for i in range(b):
            for s in range(s_q):
                keys = [int(v) for v in idx[i, s, : topk_length[i]] if 0 <= v < n_slots]
                o, l, _ = ref_rows(q[i, s], kv, keys, D**-0.5, sink)
                want_o[i, s], want_l[i, :, s] = o, l
        check("out", as_np(out), want_o, 2e-5, 2e-5)
        check("softmax_lse", as_np(lse), want_l, 1e-5, 1e-5)
        assert np.all(as_np(out)[:, :, 0] == 0.0)  # sink +inf zeroes head 0


def test_metadata_reuse_mismatch(rng):
    cache, table, _ = make_paged(rng, [20], 16)
    cache = np.nan_to_num(cache).astype(np.float32)
    q = rng.uniform(-1, 1, (1, 1, 16, D)).astype(np.float32)
    meta, none = fm.get_mla_metadata(np.array([20], np.int32), 16, 1)
    assert none is None
    fm.flash_mla_with_kvcache(q, cache, table, [20], 512, meta)
    with pytest.raises(ValueError, match="tile_scheduler_metadata.*h_q"):
        fm.flash_mla_with_kvcache(q[:, :, :8], cache, table, [20], 512, meta)
    with pytest.raises(TypeError, match="tile_scheduler_metadata"):
        fm.flash_mla_with_kvcache(q, cache, table, [20], 512, None)
    with pytest.raises(ValueError, match="num_splits"):
        fm.flash_mla_with_kvcache(q, cache, table, [20], 512, meta, np.array([0, 1]))


# ---- sparse prefill ----


def ref_sparse_fwd(q, kv, idx, scale, sink, topk_length, limit=None):
    s_q, h = q.shape[:2]
    s_kv = kv.shape[0]
    out, ml, lse = np.zeros((s_q, h, DV)), np.zeros((s_q, h)), np.zeros((s_q, h))
    for i in range(s_q):
        n = idx.shape[1] if topk_length is None else topk_length[i]
        if limit is not None:
            n = min(n, limit)
        keys = [int(v) for v in idx[i, :n] if 0 <= v < s_kv]
        out[i], lse[i], ml[i] = ref_rows(q[i], kv, keys, scale, sink)
    return out, ml, lse


@pytest.mark.parametrize("use_torch", [False, True])
def test_sparse_fwd(rng, use_torch):
    s_q, s_kv, topk = int(rng.integers(5, 40)), int(rng.integers(30, 200)), 32
    h = int(rng.choice([1, 16, 64]))
    q = rng.uniform(-1, 1, (s_q, h, D))
    kv = rng.uniform(-1, 1, (s_kv, 1, D))
    idx = np.stack([rng.permutation(s_kv + 20)[:topk] for _ in range(s_q)])  # some >= s_kv
    idx[rng.random(idx.shape) < 0.2] = -1
    idx[0] = -1  # no valid key
    topk_length = rng.integers(0, topk + 5, s_q)  # values past topk are clamped
    sink = np.array([np.inf] + list(rng.uniform(-2, 3, h - 1))) if h > 1 else np.array([-np.inf])
    scale = 1 / math.sqrt(192)
    if use_torch:
        qt = torch.from_numpy(q.astype(np.float32)).bfloat16()
        kvt = torch.from_numpy(kv.astype(np.float32)).bfloat16()
        q, kv = bf16_round(q), bf16_round(kv)
        args = (qt, kvt, torch.from_numpy(idx.astype(np.int32)).unsqueeze(1), scale)
        kw = dict(attn_sink=torch.from_numpy(sink.astype(np.float32)),
                  topk_length=torch.from_numpy(topk_length.astype(np.int32)))
    else:
        q, kv = q.astype(np.float32).astype(np.float64), kv.astype(np.float32).astype(np.float64)
        args = (q.astype(np.float32), kv.astype(np.float32), idx[:, None, :], scale)
        kw = dict(attn_sink=sink.astype(np.float32), topk_length=topk_length)
    out, max_logits, lse = fm.flash_mla_sparse_fwd(*args, **kw)
    want_o, want_m, want_l = ref_sparse_fwd(q, kv[:, 0], idx, scale, sink, np.minimum(topk_length, topk))
    tol = 1e-2 if use_torch else 2e-5
    if use_torch:
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    check("out", as_np(out), want_o, tol, tol)
    check("max_logits", as_np(max_logits), want_m, 1e-5, 1e-5)
    check("lse", as_np(lse), want_l, 1e-5, 1e-5)
    assert np.all(as_np(lse)[0] == np.inf) and np.all(as_np(max_logits)[0] == -np.inf)

    # indexer_topk: a fourth result, the LSE over the first indexer_topk entries.
    res = fm.flash_mla_sparse_fwd(*args, **kw, indexer_topk=8)
    assert len(res) == 4
    _, _, want_li = ref_sparse_fwd(q, kv[:, 0], idx, scale, None, np.minimum(topk_length, topk), limit=8)
    check("lse_indexer", as_np(res[3]), want_li, 1e-5, 1e-5)


def test_sparse_fwd_sink_leaves_lse(rng):
    q = rng.uniform(-1, 1, (3, 16, D)).astype(np.float32)
    kv = rng.uniform(-1, 1, (50, 1, D)).astype(np.float32)
    idx = rng.integers(0, 50, (3, 1, 10))
    o0, m0, l0 = fm.flash_mla_sparse_fwd(q, kv, idx, 0.05)
    sink = np.full(16, -np.inf, np.float32)
    o1, m1, l1 = fm.flash_mla_sparse_fwd(q, kv, idx, 0.05, attn_sink=sink)
    assert np.array_equal(m0, m1) and np.array_equal(l0, l1)
    np.testing.assert_allclose(o1, o0, rtol=1e-6, atol=1e-7)
    o2, _, l2 = fm.flash_mla_sparse_fwd(q, kv, idx, 0.05, attn_sink=np.full(16, np.inf, np.float32))
    assert np.all(o2 == 0) and np.array_equal(l2, l0)


# ---- errors ----


def test_errors(rng):
    cache, table, _ = make_paged(rng, [20, 10], 16)
    cache = np.nan_to_num(cache).astype(np.float32)
    q = rng.uniform(-1, 1, (2, 1, 16, D)).astype(np.float32)
    lens = np.array([20, 10], np.int32)
    call = lambda *a, **k: fm.flash_mla_with_kvcache(*a, **k)  # noqa: E731
    meta = lambda: fm.get_mla_metadata()[0]  # noqa: E731
    with pytest.raises(ValueError, match="q: head_dim"):
        call(q[..., :512].copy(), cache[..., :512].copy(), table, lens, 512, meta())
    with pytest.raises(ValueError, match="k_cache: head_dim"):
        call(q, cache[..., :512].copy(), table, lens, 512, meta())
    with pytest.raises(ValueError, match="head_dim_v"):
        call(q, cache, table, lens, 128, meta())
    with pytest.raises(ValueError, match="num_heads_q"):
        call(np.zeros((2, 1, 129, D), np.float32), cache, table, lens, 512, meta())
    with pytest.raises(ValueError, match="attn_sink"):
        call(q, cache, table, lens, 512, meta(), attn_sink=np.zeros(8, np.float32))
    bad = table.copy()
    bad[0, 0] = cache.shape[0] + 3
    with pytest.raises(ValueError, match="block_table"):
        call(q, cache, bad, lens, 512, meta())
    with pytest.raises(ringattn.InvalidArgument, match="cache_seqlens"):
        call(q, cache, table, np.array([20, 10**4], np.int32), 512, meta())
    with pytest.raises(TypeError, match="q: dtype"):
        call(q.astype(np.float16), cache, table, lens, 512, meta())
    with pytest.raises(TypeError, match="k_cache"):
        call(q, cache.view(np.uint8), table, lens, 512, meta())
    with pytest.raises(TypeError, match="block_table"):
        call(q, cache, table.astype(np.float32), lens, 512, meta())
    with pytest.raises(ValueError, match="k_cache: the fp8 cache"):
        call(q, np.zeros((4, 16, 1, 600), np.uint8), table, lens, 512, meta(), is_fp8_kvcache=True)
    with pytest.raises(ValueError, match="causal"):
        call(q, cache, None, None, 512, meta(), causal=True, indices=np.zeros((2, 1, 4), np.int32))
    with pytest.raises(ValueError, match="block_table"):
        call(q, cache, None, lens, 512, meta())
    with pytest.raises(ValueError, match="extra_k_cache"):
        call(q, cache, table, lens, 512, meta(), extra_k_cache=cache)
    with pytest.raises(TypeError, match="k_cache"):
        call(torch.from_numpy(q), cache, table, lens, 512, meta())
    kv = np.zeros((10, 1, D), np.float32)
    qs = np.zeros((3, 16, D), np.float32)
    idx = np.zeros((3, 1, 4), np.int32)
    with pytest.raises(ValueError, match="kv: h_kv"):
        fm.flash_mla_sparse_fwd(qs, np.zeros((10, 2, D), np.float32), idx, 0.1)
    with pytest.raises(ValueError, match="indices"):
        fm.flash_mla_sparse_fwd(qs, kv, np.zeros((2, 1, 4), np.int32), 0.1)
    with pytest.raises(ValueError, match="d_v"):
        fm.flash_mla_sparse_fwd(qs, kv, idx, 0.1, d_v=256)
    with pytest.raises(ValueError, match="sm_scale"):
        fm.flash_mla_sparse_fwd(qs, kv, idx, -1.0)
    with pytest.raises(TypeError, match="indices"):
        fm.flash_mla_sparse_fwd(qs, kv, idx.astype(np.float32), 0.1)
    with pytest.raises(ValueError, match="topk_length"):
        fm.flash_mla_sparse_fwd(qs, kv, idx, 0.1, topk_length=np.zeros(5, np.int32))
