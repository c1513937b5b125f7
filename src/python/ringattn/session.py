"""Inference sessions over a KV cache sharded across MPI ranks (docs/session.md).

Run under MPI (``mpirun -np 4 python3 script.py``); importing this module imports mpi4py.
A session holds, on every rank of ``group``, a paged cache of its share of each
sequence's tokens, and lives across calls:

    s = KvSession(batch=1, num_heads=32, num_kv_heads=8, head_dim=128, capacity=70000,
                  dtype=torch.bfloat16)
    pos = s.prefill_positions(prompt_len)       # this rank's prompt tokens (zigzag shard)
    out, lse = s.prefill(q[pos], k[pos], v[pos], [prompt_len])   # causal ring; K/V stay
    out, lse = s.decode(q_new, k_new, v_new)    # [b, t, h, d] identical on every rank
    out, lse, info = s.extend(q_more, k_more, v_more)            # pass-Q or pass-KV

MlaSession is the same for DeepSeek MLA (absorbed form): a latent cache [*, 576] sharded
across the ranks, decode steps of s_q >= 1 tokens (causal multi-token prediction):

    m = MlaSession(batch=1, num_heads=128, capacity=70000, dtype=torch.bfloat16)
    m.prefill(m.shard_prompt(latents, [prompt_len]), [prompt_len])   # stores; no attention
    out, lse = m.decode(q_new, kv_new)          # q [b, s_q, h, 576], kv [b, s_q, 576]

Every output equals single-process causal attention over the sequence's whole history;
LSE natural log, fp32; outputs in q's dtype and kind (torch or numpy). Every call is
collective over ``group``: bad arguments on any rank make every rank raise the same
exception ("rank R: ...").
"""

import math

import numpy as np

from . import _C, _tensor
from .ring import _collective, _comm

__all__ = ["KvSession", "MlaSession", "CACHE_LAYOUTS", "EXTEND_MODES"]

CACHE_LAYOUTS = ("round-robin", "contiguous")
EXTEND_MODES = ("auto", "pass-q", "pass-kv")
_PREFILL_LAYOUTS = {"zigzag": "zigzag", "contiguous": "contiguous", "ring": "contiguous",
                    "striped": "striped", "stripe": "striped"}


def _dtype_name(dtype):
    names = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
             "fp16": "fp16", "float16": "fp16"}
    key = str(dtype).replace("torch.", "")
    if key not in names:
        raise ValueError(f"dtype: expected fp32, bf16 or fp16 (or a torch dtype), got {dtype!r}")
    return names[key]


def _check_layouts(cache_layout, prefill_name, prefill_layout):
    """ValueError naming the argument unless the cache and prefill layouts are known."""
    if cache_layout not in CACHE_LAYOUTS:
        raise ValueError(f"cache_layout: expected one of {CACHE_LAYOUTS}, got {cache_layout!r}")
    if prefill_layout not in _PREFILL_LAYOUTS:
        raise ValueError(f"{prefill_name}: expected one of {tuple(_PREFILL_LAYOUTS)}, got "
                         f"{prefill_layout!r}")


def _scale_arg(softmax_scale):
    """softmax_scale as the bindings take it: 0.0 for None (1 / sqrt(d)), else positive and finite."""
    if softmax_scale is None:
        return 0.0
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale: must be positive and finite, got {softmax_scale!r}")
    return scale


class _ShardedSession:
    """What both sessions share: the per-rank token bookkeeping of the C++ session ``_s``."""

    @property
    def lengths(self):
        """Tokens cached per sequence (prompt + appended), a list of b ints."""
        return list(self._s.lengths())

    def prefill_positions(self, length):
        """Positions (numpy int64) of this rank's share of a `length`-token prompt, in the
        local order prefill expects."""
        return np.asarray(self._s.prefill_positions(_tensor.check_scalar_int(length, "length")),
                          dtype=np.int64)

    def shard_prompt(self, x, prompt_lens):
        """This rank's packed prompt rows from the full packed tensor x [sum(prompt_lens), ...]
        (sequence after sequence): what prefill takes."""
        index, base = [], 0
        for n in prompt_lens:
            index.append(base + self.prefill_positions(n))
            base += int(n)
        index = np.concatenate(index) if index else np.zeros(0, np.int64)
        if _tensor.is_torch(x):
            return x.index_select(0, _tensor._torch().from_numpy(index))
        return np.take(x, index, axis=0)


class KvSession(_ShardedSession):
    """A KV cache sharded across the ranks of ``group`` (default COMM_WORLD).

    batch sequences of at most ``capacity`` tokens (prompt included); heads h / h_k,
    head dims d / d_v; storage ``dtype`` (fp32, bf16, fp16). ``cache_layout``: who owns
    tokens appended after the prompt ("round-robin": blocks of page_size tokens, the
    default, balances decode; "contiguous": one range per rank). ``prefill_layout``: the
    prompt shard each rank holds (zigzag by default). The session is causal;
    ``window_size=(left, 0)`` adds a sliding window (decode and prefill only). ``sinks``:
    optional [h] fp32 attention-sink logits, the same on every rank, applied once per
    output row after the merge (the LSE excludes them). ``attention_chunk=C > 0``: chunked
    local attention (FA3, Llama 4) at absolute positions: the token at position p sees only
    the history in [C floor(p / C), p] (prefill, decode and extend).
    """

    def __init__(self, batch, num_heads, num_kv_heads, head_dim, capacity, *, head_dim_v=None,
                 dtype="bf16", page_size=256, cache_layout="round-robin", prefill_layout="zigzag",
                 softmax_scale=None, window_size=(-1, 0), softcap=0.0, sinks=None, group=None,
                 attention_chunk=0):
        self._comm = _comm(group)
        d = _tensor.check_scalar_int(head_dim, "head_dim")
        d_v = d if head_dim_v is None else _tensor.check_scalar_int(head_dim_v, "head_dim_v")

        def local():
            _check_layouts(cache_layout, "prefill_layout", prefill_layout)
            wl, wr = _tensor.window_pair(window_size)
            if wr not in (0, -1):
                raise ValueError(f"window_size: right must be 0 or -1 (the session is causal), got {wr}")
            scale = _scale_arg(softmax_scale)
            cap = float(softcap)
            if not (math.isfinite(cap) and cap >= 0):
                raise ValueError(f"softcap: must be finite and >= 0, got {softcap!r}")
            if sinks is not None:
                _tensor.sinks_arg(sinks, None, _tensor.check_scalar_int(num_heads, "num_heads"), sinks)
            chunk = _tensor.check_scalar_int(attention_chunk, "attention_chunk")
            if chunk < 0:
                raise ValueError(f"attention_chunk: must be >= 0 (0 = off), got {chunk}")
            ints = [_tensor.check_scalar_int(x, n) for x, n in
                    ((batch, "batch"), (num_heads, "num_heads"), (num_kv_heads, "num_kv_heads"),
                     (capacity, "capacity"), (page_size, "page_size"))]
            return _dtype_name(dtype), ints, scale, wl, cap, chunk

        typ, (b, h, h_k, capacity, page_size), scale, wl, cap, chunk = _collective(
            self._comm, local)[self._comm.Get_rank()]
        self._dtype = typ
        self._shape = (b, h, h_k, d, d_v)
        sink_keep, sink_arg = (None, None) if sinks is None else _tensor.sinks_arg(sinks, None, h, sinks)
        self._s = _C.KvSession(self._comm.py2f(), typ, b, h, h_k, d, d_v, capacity, page_size,
                               cache_layout, _PREFILL_LAYOUTS[prefill_layout], scale, wl, cap, sink_arg,
                               chunk)
        del sink_keep

    def _args(self, tensors, names):
        """Contiguous tensors (same kind, the session's dtype), checked on every rank and
        agreed collectively."""
        keep = []

        def local():
            _tensor.type_of(tensors[0], names[0])
            _tensor.same_kind(tensors[0], dict(zip(names, tensors)))
            for x, n in zip(tensors, names):
                typ = _tensor.type_of(x, n)
                if typ != self._dtype:
                    raise TypeError(f"{n}: dtype {typ} must be the session's {self._dtype}")
                keep.append(x.contiguous() if _tensor.is_torch(x) else np.ascontiguousarray(x))

        _collective(self._comm, local)
        return keep

    def prefill(self, q, k, v, prompt_lens):
        """Starts the session: prompt_lens (b ints, the same on every rank); q [t_local, h, d],
        k [t_local, h_k, d], v [t_local, h_k, d_v]: this rank's packed shard (shard_prompt).
        Returns (out [t_local, h, d_v] in q's dtype, lse [h, t_local] fp32) and keeps the K/V."""
        lens = [_tensor.check_scalar_int(n, "prompt_lens[i]") for n in prompt_lens]
        q, k, v = self._args([q, k, v], ["q", "k", "v"])
        b, h, h_k, d, d_v = self._shape
        t = int(q.shape[0]) if len(q.shape) == 3 else 0
        out = _tensor.empty(q, (t, h, d_v), "fp32")
        lse = _tensor.empty(q, (h, t), "fp32")
        a = _tensor.arg
        self.last_stats = self._s.prefill(lens, a(q, "q"), a(k, "k"), a(v, "v"),
                                          a(out, "out", types=("fp32",)),
                                          a(lse, "lse", types=("fp32",)))
        return _tensor.to_type(out, _tensor.out_type(self._dtype)), lse

    def _step(self, q, k, v, root):
        q, k, v = self._args([q, k, v], ["q", "k", "v"])
        b, h, h_k, d, d_v = self._shape
        t = int(q.shape[1]) if len(q.shape) == 4 else 0
        out = _tensor.empty(q, (b, t, h, d_v), "fp32")
        lse = _tensor.empty(q, (b, h, t), "fp32")
        r = -1 if root is None else _tensor.check_scalar_int(root, "root")
        return q, k, v, out, lse, r

    def decode(self, q, k, v, root=None):
        """One decode step: q [b, t, h, d], k [b, t, h_k, d], v [b, t, h_k, d_v], identical on
        every rank (t tokens per sequence, causal among themselves). The new K/V are appended
        on the ranks that own them. Returns (out [b, t, h, d_v] in q's dtype, lse [b, h, t]
        fp32) on every rank, or with root=R on rank R only ((None, None) elsewhere)."""
        q, k, v, out, lse, r = self._step(q, k, v, root)
        a = _tensor.arg
        self.last_stats = self._s.decode(a(q, "q"), a(k, "k"), a(v, "v"), a(out, "out", types=("fp32",)),
                                         a(lse, "lse", types=("fp32",)), r)
        if r >= 0 and self._comm.Get_rank() != r:
            return None, None
        return _tensor.to_type(out, _tensor.out_type(self._dtype)), lse

    def extend(self, q, k, v, mode="auto", root=None):
        """A follow-up prefill: S1 new tokens per sequence (q [b, S1, h, d], ...; identical on
        every rank) attend to the whole cached context and causally to each other; their K/V
        join the cache. mode "auto" (cost model), "pass-q" or "pass-kv". Returns
        (out [b, S1, h, d_v], lse [b, h, S1], info) where info says which mode ran and why."""
        q, k, v, out, lse, r = self._step(q, k, v, root)
        a = _tensor.arg
        info = self._s.extend(a(q, "q"), a(k, "k"), a(v, "v"), a(out, "out", types=("fp32",)),
                              a(lse, "lse", types=("fp32",)), str(mode), r)
        self.last_stats = info
        if r >= 0 and self._comm.Get_rank() != r:
            return None, None, dict(info)
        return _tensor.to_type(out, _tensor.out_type(self._dtype)), lse, dict(info)


class MlaSession(_ShardedSession):
    """A DeepSeek MLA latent cache sharded across the ranks of ``group`` (default
    COMM_WORLD), living across decode steps (docs/session.md, "MLA sessions").

    batch sequences of at most ``capacity`` tokens (prompt included); ``num_heads`` query
    heads (1..128); ``dtype``: the latent cache's storage (fp32 or bf16, torch dtypes
    accepted), ``q_dtype`` the queries' (default: ``dtype``). ``cache_layout``: owner of
    tokens appended after the prompt ("round-robin" blocks of page_size tokens, the default,
    or "contiguous"); ``prompt_layout``: the prompt share each rank holds ("contiguous" by
    default: rank r holds [r S0 / P, (r + 1) S0 / P); or "zigzag", "striped").
    ``softmax_scale`` defaults to 1 / sqrt(576). ``sinks``: optional [h] fp32 attention-sink
    logits, the same on every rank, applied once per output row after the merge.

    prefill stores the prompt's latents and runs no attention: absorbed MLA prefill needs
    the model's projection weights; the prompt's outputs come from the model's own prefill.
    """

    def __init__(self, batch, num_heads, capacity, *, dtype="bf16", q_dtype=None, page_size=64,
                 cache_layout="round-robin", prompt_layout="contiguous", softmax_scale=None,
                 sinks=None, group=None):
        self._comm = _comm(group)

        def local():
            _check_layouts(cache_layout, "prompt_layout", prompt_layout)
            kv_t = _dtype_name(dtype)
            q_t = kv_t if q_dtype is None else _dtype_name(q_dtype)
            for n, t in (("dtype", kv_t), ("q_dtype", q_t)):
                if t not in ("fp32", "bf16"):
                    raise ValueError(f"{n}: MLA sessions store fp32 or bf16, got {t}")
            scale = _scale_arg(softmax_scale)
            h = _tensor.check_scalar_int(num_heads, "num_heads")
            if sinks is not None:
                _tensor.sinks_arg(sinks, None, h, sinks)
            ints = [_tensor.check_scalar_int(x, n) for x, n in
                    ((batch, "batch"), (capacity, "capacity"), (page_size, "page_size"))]
            return q_t, kv_t, h, ints, scale

        q_t, kv_t, h, (b, capacity, page_size), scale = _collective(self._comm, local)[
            self._comm.Get_rank()]
        self._q_dtype, self._kv_dtype, self._shape = q_t, kv_t, (b, h)
        sink_keep, sink_arg = (None, None) if sinks is None else _tensor.sinks_arg(sinks, None, h, sinks)
        self._s = _C.MlaSession(self._comm.py2f(), q_t, kv_t, b, h, capacity, page_size,
                                cache_layout, _PREFILL_LAYOUTS[prompt_layout], scale, sink_arg)
        del sink_keep

    def _checked(self, pairs):
        keep = []

        def local():
            _tensor.same_kind(pairs[0][0], {n: x for x, n, _ in pairs})
            for x, n, want in pairs:
                typ = _tensor.type_of(x, n)
                if typ != want:
                    raise TypeError(f"{n}: dtype {typ} must be the session's {want}")
                keep.append(x.contiguous() if _tensor.is_torch(x) else np.ascontiguousarray(x))

        _collective(self._comm, local)
        return keep

    def prefill(self, kv, prompt_lens):
        """Starts the session: prompt_lens (b ints, the same on every rank); kv [t_local, 576]
        this rank's packed latents (shard_prompt of the whole [sum(prompt_lens), 576])."""
        lens = [_tensor.check_scalar_int(n, "prompt_lens[i]") for n in prompt_lens]
        (kv,) = self._checked([(kv, "kv", self._kv_dtype)])
        self.last_stats = self._s.prefill(lens, _tensor.arg(kv, "kv"))

    def decode(self, q, kv, root=None):
        """One decode step of s_q tokens per sequence: q [b, s_q, h, 576] (q_dtype) and their
        latents kv [b, s_q, 576] (dtype), identical on every rank; row s sees the history and
        new tokens 0..s. The latents join the cache on their owners. Returns (out
        [b, s_q, h, 512] in q's dtype, lse [b, h, s_q] fp32 natural log, -inf for a row that
        sees nothing) on every rank, or with root=R on rank R only ((None, None) elsewhere).
        last_stats splits the step: merge_s (the reduction itself), wait_s (waiting for the
        slowest rank's local attention)."""
        q, kv = self._checked([(q, "q", self._q_dtype), (kv, "kv", self._kv_dtype)])
        b, h = self._shape
        s_q = int(q.shape[1]) if len(q.shape) == 4 else 0
        out = _tensor.empty(q, (b, s_q, h, 512), "fp32")
        lse = _tensor.empty(q, (b, h, s_q), "fp32")
        r = -1 if root is None else _tensor.check_scalar_int(root, "root")
        a = _tensor.arg
        self.last_stats = self._s.decode(a(q, "q"), a(kv, "kv"), a(out, "out", types=("fp32",)),
                                         a(lse, "lse", types=("fp32",)), r)
        if r >= 0 and self._comm.Get_rank() != r:
            return None, None
        return _tensor.to_type(out, _tensor.out_type(self._q_dtype)), lse
