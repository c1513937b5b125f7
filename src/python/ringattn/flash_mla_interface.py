"""FlashMLA's Python API (``flash_mla/flash_mla_interface.py``) on ringattn's CPU kernels.

Same function names, positional order, keyword names and defaults as FlashMLA, so code
written for it runs unchanged on CPU tensors::

    import sys
    import ringattn.flash_mla_interface as flash_mla
    sys.modules["flash_mla"] = flash_mla
    from flash_mla import get_mla_metadata, flash_mla_with_kvcache, flash_mla_sparse_fwd

DeepSeek MLA in absorbed form (docs/semantics.md section 4): one latent KV head of 576
values per token (512 latent + 64 rope); scores use all 576, V is the first 512.

Inputs are CPU ``torch.Tensor`` or ``numpy.ndarray`` (one kind per call). q and the
caches are fp32 or bf16 (bf16 needs torch: numpy has no bfloat16); outputs have q's
dtype and kind. The kernels read q and the cache in place when they are contiguous (a
contiguous copy is made otherwise). Index tensors may be int32 or int64.

Conventions, as FlashMLA returns them:

- ``softmax_lse`` / ``lse`` are the NATURAL log of the sum of exp(score) over the
  row's visible keys (FlashMLA's current kernels and ``tests/ref.py``; FlashMLA
  releases before the attention-sink update returned a base-2 LSE from
  ``flash_mla_sparse_fwd``). A row that sees no key gets output 0 and LSE **+inf**
  (FlashMLA's convention; ringattn's C++ API writes -inf there, and every ringattn
  merge accepts both).
- ``max_logits`` is the largest scaled score ``sm_scale * q.k`` over the row's valid
  keys, -inf for a row without one.
- ``attn_sink [h_q]`` fp32: the output is multiplied by
  ``exp(lse) / (exp(lse) + exp(attn_sink[h]))`` once, after the split-KV merge; the
  returned LSE and max_logits exclude the sink. +inf gives output 0, -inf changes
  nothing, a row without keys stays 0.
- Sparse indices: -1 and any index outside the cache (``>= num_blocks *
  page_block_size``, or ``>= s_kv`` in ``flash_mla_sparse_fwd``, or below -1) are
  skipped and never read. ``topk_length`` keeps only the first ``topk_length[i]``
  entries of a row (values are clamped to [0, topk]).

Differences from the GPU original: fp16 inputs, ``extra_k_cache`` /
``extra_indices_in_kvcache`` / ``extra_topk_length`` and head dims other than 576 / 512
raise ``ValueError`` / ``TypeError`` naming the argument. Sparse decode also accepts a
dense fp32 / bf16 cache (FlashMLA requires ``is_fp8_kvcache=True`` there), and
``attn_sink`` also works with dense decode. Causal decode with fewer cached tokens than
query tokens gives output 0 / LSE +inf for the rows that see nothing. There is no
backward pass.
"""

import dataclasses
import math
from typing import Optional

import numpy as np

from . import _C, _tensor

__all__ = [
    "FlashMLASchedMeta",
    "get_mla_metadata",
    "flash_mla_with_kvcache",
    "flash_mla_sparse_fwd",
]

_D_QK = 576
_D_V = 512
_FP8_BYTES = 656
_MAX_HEADS = 128


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Scheduling metadata of FlashMLA (returned empty by get_mla_metadata, filled by the
    first flash_mla_with_kvcache call that uses it).

    In ringattn, ``tile_scheduler_metadata`` holds the key splits of every decode problem
    (int32 ``[b]`` dense, ``[b * s_q]`` sparse; ``Engine::plan_mla_decode``) and
    ``num_splits`` their prefix sums (``[problems + 1]``). They change speed only, never
    results; reuse one object only for calls with the same shapes, like FlashMLA.
    """

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int

        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]

        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]

    have_initialized: bool = False

    config: Optional[Config] = None

    tile_scheduler_metadata: Optional[object] = None  # int32 [problems] key splits
    num_splits: Optional[object] = None  # int32 [problems + 1] prefix sums


def get_mla_metadata(*args, **kwargs):
    """Returns ``(FlashMLASchedMeta(), None)``: an empty scheduling object that the first
    flash_mla_with_kvcache call fills. Arguments are accepted and ignored (compatibility
    with FlashMLA's older ``get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k,
    num_heads_k, ...)``)."""
    return FlashMLASchedMeta(), None


# ---- argument helpers ----


def _is_tensor(x):
    return _tensor.is_torch(x) or isinstance(x, np.ndarray)


def _contiguous(x):
    if _tensor.is_torch(x):
        return x if x.is_contiguous() else x.contiguous()
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _shape(x, name, ndim, shape_text):
    if not _is_tensor(x):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dims {shape_text}, got shape {list(x.shape)}")
    return tuple(int(n) for n in x.shape)


def _operand(x, name, ndim, shape_text):
    """(contiguous tensor, type) of q / k_cache / kv: fp32 or bf16."""
    _shape(x, name, ndim, shape_text)
    typ = _tensor.type_of(x, name)
    if typ not in ("fp32", "bf16"):
        raise TypeError(f"{name}: dtype {typ} not supported by the MLA kernels (expected fp32 or bf16)")
    return _contiguous(x), typ


def _fp8_cache(x, name):
    """Contiguous byte view of a FlashMLA fp8 cache (uint8 or float8_e4m3fn)."""
    typ = _tensor.type_of(x, name)
    if typ not in ("u8", "fp8"):
        raise TypeError(
            f"{name}: with is_fp8_kvcache=True the cache holds {_FP8_BYTES}-byte tokens as uint8 or "
            f"float8_e4m3fn, got {typ}"
        )
    return _contiguous(x)


def _heads(h_q, name):
    if not 1 <= h_q <= _MAX_HEADS:
        raise ValueError(f"{name}: num_heads_q={h_q} must be in [1, {_MAX_HEADS}]")


def _scale(value, name):
    s = float(value)
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"{name}: must be a positive finite number, got {value!r}")
    return s


def _sink(attn_sink, h_q, ref):
    """(keep-alive fp32 contiguous tensor, TensorArg) of attn_sink [h_q], or (None, None)."""
    if attn_sink is None:
        return None, None
    _shape(attn_sink, "attn_sink", 1, "[num_heads_q]")
    if int(attn_sink.shape[0]) != h_q:
        raise ValueError(f"attn_sink: length {int(attn_sink.shape[0])} must equal num_heads_q={h_q} (q's dim)")
    typ = _tensor.type_of(attn_sink, "attn_sink")
    if typ not in _tensor.FLOAT_TYPES:
        raise TypeError(f"attn_sink: expected a float tensor (fp32), got {typ}")
    s = _contiguous(_tensor.to_type(attn_sink, "fp32"))
    return s, _tensor.arg(s, "attn_sink", types=("fp32",))


def _topk_length(topk_length, n, topk, what):
    """(keep-alive int32 array, TensorArg) of topk_length clamped to [0, topk]."""
    if topk_length is None:
        return None, None
    a, _ = _tensor.index_array(topk_length, "topk_length", ndim=1, shape_text=what)
    if a.shape[0] != n:
        raise ValueError(f"topk_length: length {a.shape[0]} must be {n} {what}")
    a = np.clip(a, 0, topk).astype(np.int32)
    return a, _tensor.arg(a, "topk_length", types=("i32",))


def _plus_inf_for_empty(lse):
    """FlashMLA writes +inf as the LSE of a row that sees no key (the kernel gives -inf)."""
    lse[lse == -math.inf] = math.inf


def _check_meta(meta, cfg):
    """ValueError naming the first field where a reused FlashMLASchedMeta disagrees."""
    for field in dataclasses.fields(cfg):
        want, got = getattr(meta.config, field.name), getattr(cfg, field.name)
        if want != got:
            raise ValueError(
                f"tile_scheduler_metadata: was made for {field.name}={want!r}, this call has "
                f"{got!r}; use one FlashMLASchedMeta per set of shapes (get_mla_metadata())"
            )


def _store_plan(meta, plan, ref):
    splits = np.asarray(plan, dtype=np.int32)
    prefix = np.concatenate([np.zeros(1, np.int32), np.cumsum(splits, dtype=np.int32)])
    if _tensor.is_torch(ref):
        torch = _tensor._torch()
        splits, prefix = torch.from_numpy(splits), torch.from_numpy(prefix)
    meta.tile_scheduler_metadata = splits
    meta.num_splits = prefix


# ---- decode ----


def flash_mla_with_kvcache(
    q,
    k_cache,
    block_table,
    cache_seqlens,
    head_dim_v,
    tile_scheduler_metadata,
    num_splits=None,
    softmax_scale=None,
    causal=False,
    is_fp8_kvcache=False,
    indices=None,
    attn_sink=None,
    extra_k_cache=None,
    extra_indices_in_kvcache=None,
    topk_length=None,
    extra_topk_length=None,
):
    """MLA decode on a paged latent cache (FlashMLA ``flash_mla_with_kvcache``).

    Arguments:
        q: [batch_size, seq_len_q, num_heads_q, 576], fp32 or bf16.
        k_cache: [num_blocks, page_block_size, 1, 576] fp32 / bf16, or with
            ``is_fp8_kvcache=True`` [num_blocks, page_block_size, 1, 656] uint8 (or
            float8_e4m3fn) in FlashMLA's layout: 512 e4m3 latent values, 4 fp32 scales
            (scale t multiplies values [128 t, 128 t + 128)), 64 bf16 rope values.
        block_table: [batch_size, max_num_blocks_per_seq] int: token t of sequence i is
            at k_cache[block_table[i, t // page_block_size], t % page_block_size].
            May be None with sparse indices.
        cache_seqlens: [batch_size] int, cached tokens per sequence (the query tokens'
            own keys included). May be None with sparse indices.
        head_dim_v: must be 512.
        tile_scheduler_metadata: FlashMLASchedMeta from get_mla_metadata().
        num_splits: must be None (FlashMLA's placeholder).
        softmax_scale: default 1 / sqrt(576).
        causal: bottom-right causal mask for seq_len_q > 1 (dense decode only).
        indices: [batch_size, seq_len_q, topk] int, sparse MLA: global slots
            (block * page_block_size + offset); -1 and out-of-range slots are skipped.
        attn_sink: [num_heads_q] fp32, see the module docstring.
        topk_length: [batch_size] int (sparse): only the first topk_length[i] indices of
            sequence i's rows are used.
        extra_k_cache, extra_indices_in_kvcache, extra_topk_length: not supported
            (must be None).

    Returns:
        out: [batch_size, seq_len_q, num_heads_q, 512] in q's dtype.
        softmax_lse: [batch_size, num_heads_q, seq_len_q] fp32, natural log; +inf for a
            row that sees no key.
    """
    meta = tile_scheduler_metadata
    if not isinstance(meta, FlashMLASchedMeta):
        raise TypeError(
            "tile_scheduler_metadata: expected the FlashMLASchedMeta returned by get_mla_metadata(), "
            f"got {type(meta).__name__}"
        )
    if num_splits is not None:
        raise ValueError(f"num_splits: must be None (FlashMLA's placeholder), got {type(num_splits).__name__}")
    for name, value in (
        ("extra_k_cache", extra_k_cache),
        ("extra_indices_in_kvcache", extra_indices_in_kvcache),
        ("extra_topk_length", extra_topk_length),
    ):
        if value is not None:
            raise ValueError(f"{name}: not supported by ringattn's MLA kernels (leave it None)")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, (int, np.integer)):
        raise TypeError(f"head_dim_v: expected an int, got {type(head_dim_v).__name__}")
    if int(head_dim_v) != _D_V:
        raise ValueError(f"head_dim_v: must be {_D_V} (the MLA latent), got {head_dim_v}")
    _tensor.same_kind(q, {"k_cache": k_cache, "block_table": block_table,
                          "cache_seqlens": cache_seqlens, "indices": indices,
                          "attn_sink": attn_sink, "topk_length": topk_length})

    q, q_type = _operand(q, "q", 4, "[batch_size, seq_len_q, num_heads_q, head_dim]")
    b, s_q, h_q, d = (int(n) for n in q.shape)
    if d != _D_QK:
        raise ValueError(f"q: head_dim={d} must be {_D_QK} (512 latent + 64 rope)")
    _heads(h_q, "q")
    kshape = _shape(k_cache, "k_cache", 4, "[num_blocks, page_block_size, num_heads_k, head_dim]")
    if kshape[2] != 1:
        raise ValueError(f"k_cache: num_heads_k={kshape[2]} must be 1 (MLA has one latent KV head)")
    if is_fp8_kvcache:
        if kshape[3] != _FP8_BYTES:
            raise ValueError(
                f"k_cache: the fp8 cache has {_FP8_BYTES} bytes a token (512 e4m3 + 16 scale bytes "
                f"+ 128 rope bytes), got last dim {kshape[3]}"
            )
        k_cache = _fp8_cache(k_cache, "k_cache")
    else:
        k_cache, _ = _operand(k_cache, "k_cache", 4, "[num_blocks, page_block_size, 1, head_dim]")
        if kshape[3] != d:
            raise ValueError(f"k_cache: head_dim={kshape[3]} must equal q's {d}")
    scale = _scale(d ** -0.5 if softmax_scale is None else softmax_scale, "softmax_scale")

    sparse = indices is not None
    keep = []
    idx_arg = tl_arg = bt_arg = sl_arg = None
    topk = None
    if sparse:
        if causal:
            raise ValueError("causal: must be False with sparse indices (the indices select the keys)")
        idx, idx_arg = _tensor.index_array(indices, "indices", ndim=3, shape_text="[batch_size, seq_len_q, topk]")
        if idx.shape[:2] != (b, s_q):
            raise ValueError(f"indices: shape {list(idx.shape)} must start with q's [batch_size, seq_len_q] = [{b}, {s_q}]")
        topk = int(idx.shape[2])
        if topk < 1:
            raise ValueError("indices: topk (last dim) must be >= 1")
        tl, tl_arg = _topk_length(topk_length, b, topk, "[batch_size]")
        keep += [idx, tl]
    else:
        if topk_length is not None:
            raise ValueError("topk_length: only used with sparse attention (indices is None)")
        if block_table is None or cache_seqlens is None:
            missing = "block_table" if block_table is None else "cache_seqlens"
            raise ValueError(f"{missing}: required for dense decode (indices is None)")
    if block_table is not None:
        bt, bt_arg = _tensor.index_array(block_table, "block_table", ndim=2,
                                         shape_text="[batch_size, max_num_blocks_per_seq]")
        if bt.shape[0] != b:
            raise ValueError(f"block_table: batch {bt.shape[0]} must equal q's batch_size={b}")
        keep.append(bt)
    if cache_seqlens is not None:
        sl, sl_arg = _tensor.index_array(cache_seqlens, "cache_seqlens", ndim=1, shape_text="[batch_size]", lo=0)
        if sl.shape[0] != b:
            raise ValueError(f"cache_seqlens: length {sl.shape[0]} must equal q's batch_size={b}")
        keep.append(sl)
    sink, sink_arg = _sink(attn_sink, h_q, q)

    cfg = FlashMLASchedMeta.Config(b, s_q, h_q, kshape[1], kshape[2], bool(causal),
                                   bool(is_fp8_kvcache), topk, None, None)
    plan = None
    if meta.have_initialized:
        _check_meta(meta, cfg)
        if meta.tile_scheduler_metadata is not None:
            plan = [int(v) for v in meta.tile_scheduler_metadata.tolist()]

    out = _tensor.empty(q, (b, s_q, h_q, _D_V), q_type)
    lse = _tensor.empty(q, (b, h_q, s_q), "fp32")
    new_plan = _C.mla_decode(
        _tensor.arg(q, "q", types=("fp32", "bf16")),
        _tensor.arg(k_cache, "k_cache", types=("u8", "fp8") if is_fp8_kvcache else ("fp32", "bf16")),
        _tensor.arg(out, "out", types=(q_type,)),
        _tensor.arg(lse, "softmax_lse", types=("fp32",)),
        bt_arg, sl_arg, idx_arg, tl_arg, sink_arg, None,
        scale, bool(causal), bool(is_fp8_kvcache), True, plan, plan is None,
    )
    if plan is None:
        meta.have_initialized = True
        meta.config = cfg
        _store_plan(meta, new_plan, q)
    del keep, sink
    _plus_inf_for_empty(lse)
    return out, lse


# ---- sparse prefill ----


def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None, indexer_topk=0):
    """Sparse MLA prefill over global indices (FlashMLA ``flash_mla_sparse_fwd``).

    Args:
        q: [s_q, h_q, 576], fp32 or bf16.
        kv: [s_kv, 1, 576], fp32 or bf16 (h_kv = 1).
        indices: [s_q, 1, topk] int: key rows of kv for each query token; -1 and any
            value outside [0, s_kv) are invalid (skipped, never read).
        sm_scale: float, the softmax scale (> 0).
        d_v: must be 512.
        attn_sink: optional [h_q] fp32; output multiplied by
            exp(lse) / (exp(lse) + exp(attn_sink)); no effect on lse and max_logits.
        topk_length: optional [s_q] int: token i uses only indices[i, :, :topk_length[i]].
        indexer_topk: int >= 0. When > 0, a fourth result lse_indexer [s_q, h_q] is the
            LSE over the first indexer_topk entries of each row only.

    Returns:
        (output, max_logits, lse), plus lse_indexer when indexer_topk > 0:
        - output: [s_q, h_q, 512] in q's dtype (0 for a row without valid keys)
        - max_logits: [s_q, h_q] fp32, max of sm_scale * q.k over valid keys (-inf if none)
        - lse: [s_q, h_q] fp32, natural log (+inf if no valid key)
    """
    _tensor.same_kind(q, {"kv": kv, "indices": indices, "attn_sink": attn_sink, "topk_length": topk_length})
    q, q_type = _operand(q, "q", 3, "[s_q, h_q, d_qk]")
    s_q, h_q, d = (int(n) for n in q.shape)
    if d != _D_QK:
        raise ValueError(f"q: d_qk={d} must be {_D_QK} (512 latent + 64 rope)")
    _heads(h_q, "q")
    kv, _ = _operand(kv, "kv", 3, "[s_kv, h_kv, d_qk]")
    s_kv, h_kv, d_kv = (int(n) for n in kv.shape)
    if h_kv != 1:
        raise ValueError(f"kv: h_kv={h_kv} must be 1 (MLA has one latent KV head)")
    if d_kv != d:
        raise ValueError(f"kv: d_qk={d_kv} must equal q's {d}")
    if isinstance(d_v, bool) or not isinstance(d_v, (int, np.integer)):
        raise TypeError(f"d_v: expected an int, got {type(d_v).__name__}")
    if int(d_v) != _D_V:
        raise ValueError(f"d_v: must be {_D_V}, got {d_v}")
    scale = _scale(sm_scale, "sm_scale")
    indexer_topk = _tensor.check_scalar_int(indexer_topk, "indexer_topk")
    if indexer_topk < 0:
        raise ValueError(f"indexer_topk: must be >= 0, got {indexer_topk}")
    idx, _ = _tensor.index_array(indices, "indices", ndim=3, shape_text="[s_q, h_kv, topk]")
    if idx.shape[0] != s_q or idx.shape[1] != 1:
        raise ValueError(f"indices: shape {list(idx.shape)} must be [s_q, h_kv, topk] = [{s_q}, 1, topk]")
    topk = int(idx.shape[2])
    if topk < 1:
        raise ValueError("indices: topk (last dim) must be >= 1")
    tl, tl_arg = _topk_length(topk_length, s_q, topk, "[s_q]")
    sink, sink_arg = _sink(attn_sink, h_q, q)

    out = _tensor.empty(q, (s_q, h_q, _D_V), q_type)
    max_logits = _tensor.empty(q, (s_q, h_q), "fp32")
    lse = _tensor.empty(q, (s_q, h_q), "fp32")
    results = [out, max_logits, lse]
    if indexer_topk > 0:
        results.append(_tensor.empty(q, (s_q, h_q), "fp32"))
    if s_q == 0:
        return tuple(results)
    if s_kv == 0:  # no key at all: every row is empty
        out[...] = 0
        max_logits[...] = -math.inf
        for r in results[2:]:
            r[...] = math.inf
        return tuple(results)

    # One sparse decode with b = s_q single-token "sequences" over the kv as one cache
    # block of s_kv tokens (mla_params.hpp): a global index is then the slot itself.
    q4 = q.reshape(s_q, 1, h_q, d)
    kv4 = kv.reshape(1, s_kv, 1, d)
    idx3 = idx.reshape(s_q, 1, topk)
    idx_arg = _tensor.arg(idx3, "indices", types=("i32",))
    _C.mla_decode(
        _tensor.arg(q4, "q", types=("fp32", "bf16")),
        _tensor.arg(kv4, "kv", types=("fp32", "bf16")),
        _tensor.arg(out.reshape(s_q, 1, h_q, _D_V), "out", types=(q_type,)),
        _tensor.arg(lse.reshape(s_q, h_q, 1), "lse", types=("fp32",)),
        None, None, idx_arg, tl_arg, sink_arg,
        _tensor.arg(max_logits.reshape(s_q, 1, h_q), "max_logits", types=("fp32",)),
        scale, False, False, True, None, False,
    )
    if indexer_topk > 0:
        # The LSE over the first indexer_topk entries: the same call with topk_length
        # capped at indexer_topk, keeping only its LSE.
        cap = np.full(s_q, min(indexer_topk, topk), np.int32) if tl is None else np.minimum(tl, indexer_topk).astype(np.int32)
        scratch = _tensor.empty(q, (s_q, 1, h_q, _D_V), q_type)
        _C.mla_decode(
            _tensor.arg(q4, "q", types=("fp32", "bf16")),
            _tensor.arg(kv4, "kv", types=("fp32", "bf16")),
            _tensor.arg(scratch, "out", types=(q_type,)),
            _tensor.arg(results[3].reshape(s_q, h_q, 1), "lse_indexer", types=("fp32",)),
            None, None, idx_arg, _tensor.arg(cap, "topk_length", types=("i32",)), None, None,
            scale, False, False, True, None, False,
        )
        _plus_inf_for_empty(results[3])
    del idx, idx3, tl, sink
    _plus_inf_for_empty(lse)
    return tuple(results)
