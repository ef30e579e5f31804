"""mHC (manifold-constrained hyper-connections): n residual streams mixed around every sub-layer.

Each site computes, from the flattened streams, three things (V4-SPEC §2.2): `pre` weights that
collapse the streams into the sub-layer input, `post` weights that spread the sub-layer output back
over the streams, and a doubly-stochastic `comb` (Sinkhorn) that mixes the residual streams.
The residual mix is applied *transposed*: X'_k = post_k * y + sum_j comb[j, k] * X_j.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels.reference import hc_mix_logits  # the head's collapse uses the same mix logits


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row-softmax, then alternate column / row normalisation (column first); [..., n, n].
    One native call on the CPU (kernels.sinkhorn); this loop was most of mHC's per-token overhead."""
    return kernels.sinkhorn(logits, iters, eps)


def hc_weights(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
               iters: int, hc_eps: float, norm_eps: float):
    """pre [..., n], post [..., n], comb [..., n, n] (all fp32) for streams x [..., n, d]: from the
    mix logits, pre = sigmoid(.) + eps, post = 2 sigmoid(.), comb = Sinkhorn(.). One native call on the
    CPU (kernels.hc_weights; its plain-torch reference is kernels.reference.hc_weights)."""
    return kernels.hc_weights(x, fn, base, scale, iters, hc_eps, norm_eps)


def _gpu(x: torch.Tensor):
    """The Triton kernels for a CUDA tensor outside autograd (one kernel where the plain path is several)."""
    return kernels.gpu_kernels(x) if not torch.is_grad_enabled() else None


def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_j pre_j X_j in fp32, cast back: [..., n, d] -> [..., d]."""
    g = _gpu(x)
    if g is not None:
        return g.hc_collapse(x, pre)
    out = (pre.unsqueeze(-1) * x).sum(dim=-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def hc_expand(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k * y + sum_j comb[j, k] X_j; x [..., n, d], y [..., d]."""
    g = _gpu(x)
    if g is not None:
        return g.hc_expand(x, y, post, comb)
    dt = x.dtype
    if post.dtype != dt:  # (a cast to the same dtype still costs a dispatch per call)
        post, comb = post.to(dt), comb.to(dt)
    return post.unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x)


def hc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse of the streams before the output norm: [..., n, d] -> [..., d]."""
    mix = hc_mix_logits(x, fn, norm_eps)
    pre = torch.sigmoid(mix * scale.float() + base.float()) + hc_eps
    return hc_collapse(x, pre)
