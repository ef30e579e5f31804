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


def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_j pre_j X_j in fp32, cast back: [..., n, d] -> [..., d] (kernels.hc_collapse)."""
    return kernels.hc_collapse(x, pre)


def hc_expand(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k * y + sum_j comb[j, k] X_j; x [..., n, d], y [..., d] (kernels.hc_expand: one native
    call on the CPU, its plain-torch reference is kernels.reference.hc_expand)."""
    return kernels.hc_expand(x, y, post, comb)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm,
           iters: int, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything mHC does before a sub-layer: the site's weights, the collapse and the sub-layer's input
    norm (an RMSNorm module) -> (the sub-layer's input, post, comb); that is
    `norm(hc_collapse(x, pre))` with `pre, post, comb = hc_weights(x, ...)`, in one native call on the CPU
    (kernels.hc_pre)."""
    return kernels.hc_pre(x, fn, base, scale, norm.weight, iters, hc_eps, norm.eps)


def hc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse of the streams before the output norm: [..., n, d] -> [..., d]."""
    mix = hc_mix_logits(x, fn, norm_eps)
    pre = torch.sigmoid(mix * scale.float() + base.float()) + hc_eps
    return hc_collapse(x, pre)
