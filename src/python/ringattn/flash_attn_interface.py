"""FlashAttention-3's Python API (hopper/flash_attn_interface.py) on ringattn's CPU kernels."""

from . import _C, _tensor


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    return_attn_probs=False):
    qa = _tensor.arg(q, "q", ndim=4)
    b, s_q, h, _ = q.shape
    d_v = v.shape[-1]
    typ = _tensor.type_of(q, "q")
    out = _tensor.empty(q, (b, s_q, h, d_v), typ)
    lse = _tensor.empty(q, (b, h, s_q), "fp32")
    wl, wr = _tensor.window_pair(window_size)
    _C.fwd(qa, _tensor.arg(k, "k", ndim=4), _tensor.arg(v, "v", ndim=4), _tensor.arg(out, "out"),
           _tensor.arg(lse, "lse", types=("fp32",)), None, None, None, None, 0, 0,
           0.0 if softmax_scale is None else float(softmax_scale), bool(causal), wl, wr, float(softcap), 0)
    return (out, lse) if return_attn_probs else out
