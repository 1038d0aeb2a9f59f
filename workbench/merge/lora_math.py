"""ΔW of one LoRA-family module, with the formulas the loaders use (fp32, unscaled).

Why a module of its own: the merge's bake (workbench/merge/lora.py) and the generation-time path for
the LyCORIS types (workbench/pipeline/loras.py) must compute the same numbers. Sources read (study only,
no code copied): LyCORIS f49d30d6 (lycoris/functional/{loha,lokr,general}.py, lycoris/modules/
{loha,lokr}.py), peft 0.21 (tuners/loha/layer.py, tuners/lokr/layer.py, tuners/lora/dora.py) and
ComfyUI a125cd84 (comfy/weight_adapter/{lora,loha,lokr,base}.py). Tensor names are LyCORIS'.

- LoRA/LoCon: up @ down; with Tucker (`lora_mid`, LoCon `use_tucker`): ΔW[o,i,k,l] =
  Σ_mn up[o,m]·mid[m,n,k,l]·down[n,i].
- LoHa: (w1a @ w1b) ⊙ (w2a @ w2b); Tucker/CP (`hada_t1/t2`, conv): each factor is
  Σ_ij t[i,j,k,l]·w_a[i,o]·w_b[j,i'] (then w_a is [rank, out], w_b [rank, in]).
- LoKr: kron(w1, w2), w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 = lokr_w2, lokr_w2_a @ lokr_w2_b
  (conv: w2_b is [rank, in·k·k]) or Tucker Σ t2·w2_a·w2_b; a 4-D w2 gets w1 as [a, c, 1, 1].

Scales are applied by the caller: alpha/rank for LoRA and LoHa (rank = down.shape[0] /
hada_w1_b.shape[0]); LoKr uses alpha/rank only when a side is factored (rank = lokr_w2_b.shape[0],
else lokr_w1_b.shape[0]) and 1 when both sides are full matrices (LyCORIS: "use scale = 1").

DoRA (`dora_apply`): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm per output row (over input and kernel
dims, peft's `get_weight_norm` and LyCORIS `wd_on_out=True`, the default and what we train) or, for
files whose magnitude is [1, in, ...] (LyCORIS `wd_on_out=False`, older files), per input column.
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps  # LyCORIS and ComfyUI add this to the norm; peft does not


def lora(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """[out, in·k·k] (no Tucker) or [out, in, k, k] (Tucker)."""
    rank = down.shape[0]
    if mid is None:
        return up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)
    return torch.einsum("mn...,im,nj->ij...", mid, up.reshape(up.shape[0], -1),
                        down.reshape(rank, -1))


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Σ_ij t[i,j,...]·wa[i,p]·wb[j,r] -> [p, r, ...] (LyCORIS rebuild_tucker)."""
    return torch.einsum("ij...,ip,jr->pr...", t, wa, wb)


def loha(w1a, w1b, w2a, w2b, t1=None, t2=None) -> torch.Tensor:
    """[out, in·k·k] (no Tucker) or [out, in, k, k] (Tucker)."""
    if t1 is not None and t2 is not None:
        return _tucker(t1, w1a, w1b) * _tucker(t2, w2a, w2b)
    r1, r2 = w1b.shape[0], w2b.shape[0]
    return (w1a.reshape(w1a.shape[0], r1) @ w1b.reshape(r1, -1)) * \
        (w2a.reshape(w2a.shape[0], r2) @ w2b.reshape(r2, -1))


def lokr(w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None) -> torch.Tensor:
    """kron(w1, w2): [a·b, c·d·k·k] or [a·b, c·d, k, k]."""
    if w1 is None:
        w1 = w1a @ w1b
    if w2 is None:
        if t2 is not None:
            w2 = _tucker(t2, w2a, w2b)
        else:
            w2 = w2a @ w2b.reshape(w2b.shape[0], -1)
    if w2.dim() == 4 and w1.dim() == 2:
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous())


def lokr_rank(w1b: tuple | None, w2b: tuple | None) -> int | None:
    """The rank alpha divides by (None: both sides are full matrices, scale 1)."""
    if w2b is not None:
        return int(w2b[0])
    if w1b is not None:
        return int(w1b[0])
    return None


def dora_axis(magnitude_shape: tuple[int, ...], out_features: int, in_features: int,
              peft: bool = False) -> str:
    """"out" (norm per output row) or "in" (per input column) for a DoRA magnitude tensor.

    peft stores [out] (Linear) or [1, out, 1, 1] (Conv), always per output; LyCORIS/kohya
    `dora_scale` is [out, 1, ...] (wd_on_out=True) or [1, in, ...] (wd_on_out=False); ComfyUI tells
    them apart the same way (shape[0] == out rows)."""
    numel = 1
    for d in magnitude_shape:
        numel *= d
    if peft:
        return "out" if numel == out_features else ""
    if magnitude_shape and magnitude_shape[0] == out_features and numel == out_features:
        return "out"
    if len(magnitude_shape) >= 2 and magnitude_shape[0] == 1 and numel == in_features:
        return "in"
    return ""


def dora_apply(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
               axis: str) -> torch.Tensor:
    """m ⊙ (W + ΔW) / ‖W + ΔW‖ for a weight of any rank (Linear [out, in], Conv [out, in, k, k])."""
    merged = weight + delta
    if axis == "out":
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        shape = (merged.shape[0],) + (1,) * (merged.dim() - 1)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        shape = (1, merged.shape[1]) + (1,) * (merged.dim() - 2)
    scale = magnitude.reshape(shape) / (norm.reshape(shape) + EPS)
    return merged * scale
