"""Merge methods: small pure functions on ONE key's tensors, registered by name.

Why this shape (sd-mecha's idea: a merge method is a small typed function): the math of a merge is
a few lines per method, and everything else (reading files, casting to fp32, choosing α per block,
threads, writing) belongs to the executor. So a method is `fn(*tensors, **params) -> Tensor`, with
its parameters declared once in the decorator (default, one-line doc, type), checked before any
tensor is read.

Contract for every method:
- inputs are fp32 tensors of one key with equal shapes (the executor casts and handles mismatches);
- inputs are never modified; the result is always a new tensor;
- `key` (the tensor name) is a reserved keyword the executor may pass to any method through
  `MergeMethod.__call__`; only methods that declare a `key` argument (dare) receive it.

Input order conventions:
- two-model methods: (a, b), α is the share of b as in A1111 / supermerger;
- add-difference family (add_difference, train_difference, dare): (a, b, c) = (target, model,
  base-of-model), A1111's order, result = a + α·f(b − c);
- N-model task-vector methods (ties, model_stock): the BASE comes FIRST, then the models.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import itertools
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import torch

from workbench.errors import WorkbenchError


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

class _Required:
    """Sentinel default: the parameter has no default and must be given."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
RESERVED = frozenset({"key"})


@dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter: default (or REQUIRED), a one-line doc, its type and an optional range check."""

    default: Any
    doc: str
    type: type = float
    check: Callable[[Any], bool] | None = None
    valid: str = ""  # human text for `check`, e.g. "0 < k <= 1"

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method; call it as `method(*tensors, key=name, **params)`."""

    name: str
    fn: Callable[..., torch.Tensor]
    n_inputs: int                      # exact count, or the minimum when `variadic`
    variadic: bool
    params: Mapping[str, ParamSpec]
    description: str
    formula: str
    input_names: tuple[str, ...]
    uses_key: bool = field(default=False)
    # each output element depends only on the inputs at that element: the executor may evaluate
    # the method on cache-sized slices of a tensor (same bits, far less memory traffic)
    elementwise: bool = False
    # alpha comes from the recipe's `blocks:` (per key, by its block), which is then required
    alpha_from_blocks: bool = False

    @property
    def inputs_text(self) -> str:
        return f"{self.n_inputs}+" if self.variadic else str(self.n_inputs)

    def check_inputs(self, n: int) -> None:
        """Raise WorkbenchError when `n` inputs do not fit this method."""
        if n == self.n_inputs or (self.variadic and n > self.n_inputs):
            return
        want = f"at least {self.n_inputs}" if self.variadic else str(self.n_inputs)
        raise WorkbenchError(
            f"merge method '{self.name}' takes {want} inputs ({', '.join(self.input_names)}), got {n}")

    def __call__(self, *tensors: torch.Tensor, key: str = "", **params: Any) -> torch.Tensor:
        """Validate, fill defaults and run on one key's tensors (validation costs microseconds)."""
        self.check_inputs(len(tensors))
        full = validate_params(self.name, params)
        if self.uses_key:
            full["key"] = key
        return self.fn(*tensors, **full)


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, inputs: int | str, params: Mapping[str, ParamSpec] | None = None,
                 description: str, formula: str, elementwise: bool = False,
                 alpha_from_blocks: bool = False) -> Callable[[Callable], Callable]:
    """Register `fn` under `name`. Checks the signature at import time, so a slip fails loudly.

    `inputs` is an int (exact) or "N+" (at least N). The function's keyword-only arguments must be
    exactly the declared `params` (plus the optional reserved `key`); defaults live in `params` only.
    """
    params = dict(params or {})
    if isinstance(inputs, str):
        if not (inputs.endswith("+") and inputs[:-1].isdigit()):
            raise ValueError(f"{name}: inputs must be an int or 'N+', got {inputs!r}")
        n_inputs, variadic = int(inputs[:-1]), True
    else:
        n_inputs, variadic = int(inputs), False

    def register(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        sig = inspect.signature(fn)
        positional = [p.name for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        star = [p.name for p in sig.parameters.values() if p.kind == p.VAR_POSITIONAL]
        kwonly = {p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY}
        fits = len(positional) <= n_inputs if variadic else len(positional) == n_inputs
        if bool(star) != variadic or not fits:
            raise ValueError(f"{name}: signature {sig} does not match inputs={inputs!r}")
        if kwonly - RESERVED != set(params):
            raise ValueError(f"{name}: keyword arguments {sorted(kwonly)} != declared params {sorted(params)}")
        if RESERVED & set(params):
            raise ValueError(f"{name}: parameter names {sorted(RESERVED)} are reserved")
        names = tuple(positional) + ((f"{star[0]}...",) if star else ())
        METHODS[name] = MergeMethod(name=name, fn=fn, n_inputs=n_inputs, variadic=variadic,
                                    params=MappingProxyType(params), description=description,
                                    formula=formula, input_names=names, uses_key="key" in kwonly,
                                    elementwise=elementwise, alpha_from_blocks=alpha_from_blocks)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    """The method registered as `name`; unknown names raise with the nearest known name."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name), METHODS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise WorkbenchError(f"unknown merge method '{name}'{hint}; known methods: {', '.join(sorted(METHODS))}")


def _coerce(method: str, pname: str, spec: ParamSpec, value: Any) -> Any:
    """Check one value's type (int is accepted for float; bool is never a number) and range."""
    t = spec.type
    ok = isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise WorkbenchError(f"merge method '{method}': parameter '{pname}' must be {_TYPE_NAMES[t]}, "
                             f"got {value!r} ({type(value).__name__})")
    if t is float and not math.isfinite(value):
        raise WorkbenchError(f"merge method '{method}': parameter '{pname}' must be finite, got {value!r}")
    if spec.check is not None and not spec.check(value):
        raise WorkbenchError(f"merge method '{method}': parameter '{pname}' must satisfy {spec.valid}, "
                             f"got {value!r}")
    return value


def validate_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check `params` against method `name`; return them with defaults filled in.

    Raises WorkbenchError naming the unknown, missing or wrongly typed parameter.
    """
    method = get_method(name)
    specs = method.params
    for pname in params:
        if pname in RESERVED:
            raise WorkbenchError(f"merge method '{name}': '{pname}' is reserved (the executor passes the "
                                 f"tensor name); remove it from the parameters")
        if pname not in specs:
            close = difflib.get_close_matches(str(pname), specs, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = ", ".join(specs) if specs else "none"
            raise WorkbenchError(f"merge method '{name}': unknown parameter '{pname}'{hint}; "
                                 f"parameters are: {known}")
    out: dict[str, Any] = {}
    for pname, spec in specs.items():
        if pname in params:
            out[pname] = _coerce(name, pname, spec, params[pname])
        elif spec.required:
            raise WorkbenchError(f"merge method '{name}': missing required parameter '{pname}' ({spec.doc})")
        else:
            out[pname] = spec.default
    return out


def describe_methods() -> str:
    """Text for `workbench merge --list`: name, inputs, formula and parameters of every method."""
    lines: list[str] = []
    for m in sorted(METHODS.values(), key=lambda m: m.name):
        lines.append(f"{m.name}  inputs: {m.inputs_text} ({', '.join(m.input_names)})")
        lines.append(f"    {m.formula}")
        lines.append(f"    {m.description}")
        for pname, spec in m.params.items():
            default = "required" if spec.required else f"default {spec.default!r}"
            rng = f", {spec.valid}" if spec.valid else ""
            lines.append(f"    - {pname} ({spec.type.__name__}, {default}{rng}): {spec.doc}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# Parameter specs shared by several methods
# --------------------------------------------------------------------------------------------------

def _unit(v: float) -> bool:
    return 0.0 <= v <= 1.0


ALPHA_B = ParamSpec(REQUIRED, "share of b: 0 keeps a, 1 gives b")
ALPHA_DIFF = ParamSpec(REQUIRED, "multiplier of the difference (b - c) added to a")
ALPHA_TASK = ParamSpec(1.0, "multiplier of the merged task vector added to the base")


# --------------------------------------------------------------------------------------------------
# Linear methods
# --------------------------------------------------------------------------------------------------

@merge_method("weighted_sum", inputs=2, params={"alpha": ALPHA_B},
              formula="(1 - alpha)*a + alpha*b",
              description="Linear interpolation; bit-exact with A1111's formula (not torch.lerp).",
              elementwise=True)
def weighted_sum(a: torch.Tensor, b: torch.Tensor, *, alpha: float) -> torch.Tensor:
    return (1 - alpha) * a + alpha * b


# weighted_sum under the name supermerger users know; the recipe gives `blocks` instead of alpha, and
# the executor passes each key's block value as `alpha` (workbench/merge/build.py).
merge_method("block_weighted", inputs=2, params={"alpha": ALPHA_B},
             formula="(1 - alpha)*a + alpha*b, alpha chosen per key by its block",
             description="weighted_sum whose alpha the executor supplies per key from the recipe's `blocks`.",
             elementwise=True, alpha_from_blocks=True)(weighted_sum)


@merge_method("add_difference", inputs=3, params={"alpha": ALPHA_DIFF},
              formula="a + alpha*(b - c)",
              description="Add b's difference from its base c onto a.", elementwise=True)
def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float) -> torch.Tensor:
    return a + alpha * (b - c)


@merge_method("triple_sum", inputs=3,
              params={"alpha": ParamSpec(REQUIRED, "share of b"), "beta": ParamSpec(REQUIRED, "share of c")},
              formula="(1 - alpha - beta)*a + alpha*b + beta*c",
              description="Three-model weighted sum (supermerger 'Triple sum').", elementwise=True)
def triple_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float, beta: float) -> torch.Tensor:
    return (1 - alpha - beta) * a + alpha * b + beta * c


@merge_method("sum_twice", inputs=3,
              params={"alpha": ParamSpec(REQUIRED, "share of b in the first sum"),
                      "beta": ParamSpec(REQUIRED, "share of c in the second sum")},
              formula="(1 - beta)*((1 - alpha)*a + alpha*b) + beta*c",
              description="Weighted sum of a and b, then weighted sum with c (supermerger 'Sum twice').",
              elementwise=True)
def sum_twice(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float, beta: float) -> torch.Tensor:
    return (1 - beta) * ((1 - alpha) * a + alpha * b) + beta * c


@merge_method("no_merge", inputs=1, formula="a",
              description="Copy a unchanged (convert dtype, prune, bake a VAE with a later step).",
              elementwise=True)
def no_merge(a: torch.Tensor) -> torch.Tensor:
    return a.clone()


# --------------------------------------------------------------------------------------------------
# supermerger calc modes: train difference, cosine A/B
# --------------------------------------------------------------------------------------------------

# Source: supermerger `scripts/mergers/mergers.py::traindiff` (hako-mikan/sd-webui-supermerger 0b1c491,
# 2025-11-28), "trainDifference" calc mode of the Add difference mode; sd-mecha's
# `train_difference_mask` (ljleb/sd-mecha b8d4d88) states the same mask. Per element:
#   scale = |b - a| / (|b - c| + |b - a|)   (0 where the denominator is 0)
#   result = a + 1.8*alpha * sign(b - c) * scale * |b - c|
# i.e. the difference b - c is damped where a already sits near b (as if "trained" onto a).
@merge_method("train_difference", inputs=3, params={"alpha": ALPHA_DIFF},
              formula="a + 1.8*alpha*(b - c)*|b - a| / (|b - a| + |b - c|)   (0/0 -> 0)",
              description="supermerger 'trainDifference': add-difference damped where a is already close to b.")
def train_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float) -> torch.Tensor:
    if torch.equal(b, c):  # supermerger skips such keys and keeps a
        return a.clone()
    diff = b - c
    dist_bc = diff.abs()
    dist_ba = (b - a).abs()
    total = dist_bc + dist_ba
    scale = torch.where(total != 0, dist_ba / total, torch.zeros((), dtype=a.dtype, device=a.device))
    new_diff = torch.sign(diff) * scale.abs() * dist_bc
    return a + new_diff * (alpha * 1.8)


def _as_1d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1) if t.dim() == 0 else t


def _flat_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine of the flattened tensors; 0 when a norm is 0 (instead of NaN)."""
    den = (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)).clamp_min(1e-12)
    return torch.sum(x * y) / den


def cosine_similarity_values(variant: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-key similarity used for the merge, values supermerger's Stage 0 collects for the range).

    variant "a": column cosine along dim 0 of the dim-0-normalised tensors, averaged with the
    flattened cosine of those normalised tensors; Stage 0 collects only the column cosines.
    variant "b": the same on the raw tensors; Stage 0 collects the combined value.
    """
    a, b = _as_1d(a), _as_1d(b)
    if variant == "a":
        a = torch.nn.functional.normalize(a, p=2, dim=0)
        b = torch.nn.functional.normalize(b, p=2, dim=0)
    column = torch.nn.functional.cosine_similarity(a, b, dim=0)
    combined = (column + _flat_cos(a, b)) / 2.0
    return combined, (column if variant == "a" else combined)


def cosine_similarity_range(values: list[torch.Tensor] | np.ndarray) -> tuple[float, float]:
    """(sim_min, sim_max) as supermerger's Stage 0 computes them over all keys (VAE keys excluded):
    drop NaN, drop values below the 1st percentile, then above the 99th of what is left (midpoint)."""
    if isinstance(values, np.ndarray):
        sims = values.astype(np.float64).ravel()
    else:
        sims = np.concatenate([np.asarray(v.detach().cpu(), dtype=np.float64).ravel() for v in values])
    sims = sims[~np.isnan(sims)]
    if sims.size == 0:
        raise WorkbenchError("cosine merge: no similarity values to compute the range from")
    sims = sims[sims >= np.percentile(sims, 1, method="midpoint")]
    sims = sims[sims <= np.percentile(sims, 99, method="midpoint")]
    return float(sims.min()), float(sims.max())


def _add_cosine(variant: str, a: torch.Tensor, b: torch.Tensor, alpha: float,
                sim_min: float, sim_max: float) -> torch.Tensor:
    if sim_max <= sim_min:
        raise WorkbenchError(f"add_cosine_{variant}: sim_max ({sim_max}) must be greater than sim_min ({sim_min})")
    sim, _ = cosine_similarity_values(variant, a, b)
    k = (sim - sim_min) / (sim_max - sim_min)
    k = (k - (abs(alpha) if variant == "a" else alpha)).clamp(0.0, 1.0)  # share of a
    shape = a.shape
    out = (1 - k) * _as_1d(b) + k * _as_1d(a)
    return out.reshape(shape)


_COSINE_PARAMS = {
    "alpha": ParamSpec(REQUIRED, "shifts the per-key share toward b (larger alpha -> more b)"),
    "sim_min": ParamSpec(0.0, "lowest similarity over the model (supermerger Stage 0); executor may supply"),
    "sim_max": ParamSpec(1.0, "highest similarity over the model (supermerger Stage 0); executor may supply"),
}

# Source: supermerger `scripts/mergers/mergers.py::precosine/cosine` (0b1c491) and calcmode_en.md
# ("cosineA/cosineB", weight-sum mode); sd-mecha `merge_methods/cosine.py` is the per-key variant.
# Per key: s = combined similarity (see cosine_similarity_values), k = clamp((s - sim_min) /
# (sim_max - sim_min) - alpha, 0, 1) broadcast over dim 0, result = k*a + (1 - k)*b. supermerger
# normalises s by the min/max over the whole model; with the defaults (0, 1) the method is purely per
# key (sd-mecha's behaviour). For supermerger-exact output the executor runs a pre-pass with
# cosine_similarity_values(...)[1] over all non-VAE keys and passes cosine_similarity_range(...).
@merge_method("add_cosine_a", inputs=2, params=_COSINE_PARAMS,
              formula="k*a + (1-k)*b, k = clamp(norm(cos(a_n, b_n)) - |alpha|, 0, 1), a_n/b_n normalised along dim 0",
              description="supermerger 'cosineA': similarity-gated weighted sum favouring a's structure.")
def add_cosine_a(a: torch.Tensor, b: torch.Tensor, *, alpha: float, sim_min: float, sim_max: float) -> torch.Tensor:
    return _add_cosine("a", a, b, alpha, sim_min, sim_max)


@merge_method("add_cosine_b", inputs=2, params=_COSINE_PARAMS,
              formula="k*a + (1-k)*b, k = clamp(norm(cos(a, b)) - alpha, 0, 1)",
              description="supermerger 'cosineB': similarity-gated weighted sum favouring b's structure.")
def add_cosine_b(a: torch.Tensor, b: torch.Tensor, *, alpha: float, sim_min: float, sim_max: float) -> torch.Tensor:
    return _add_cosine("b", a, b, alpha, sim_min, sim_max)


# --------------------------------------------------------------------------------------------------
# Geometric and task-vector methods
# --------------------------------------------------------------------------------------------------

SLERP_COLINEAR_EPS = 1e-6


@merge_method("slerp", inputs=2, params={"alpha": ALPHA_B},
              formula="direction: slerp(a/|a|, b/|b|, alpha); norm: (1-alpha)*|a| + alpha*|b|",
              description="Spherical interpolation of the flattened tensors (sd-mecha's form); "
                          "falls back to weighted_sum when a or b is zero or they are (anti)colinear.")
def slerp(a: torch.Tensor, b: torch.Tensor, *, alpha: float) -> torch.Tensor:
    if alpha == 0.0:
        return a.clone()
    if alpha == 1.0:
        return b.clone()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        return (1 - alpha) * a + alpha * b
    ua, ub = a / na, b / nb
    dot = torch.sum(ua * ub).clamp(-1.0, 1.0)
    if abs(float(dot)) > 1.0 - SLERP_COLINEAR_EPS:
        return (1 - alpha) * a + alpha * b
    omega = torch.arccos(dot)
    sin_omega = torch.sin(omega)
    direction = (torch.sin((1 - alpha) * omega) / sin_omega) * ua + (torch.sin(alpha * omega) / sin_omega) * ub
    return ((1 - alpha) * na + alpha * nb) * direction


def _trim_top_k(tau: torch.Tensor, k: float) -> torch.Tensor:
    """Keep the round(k*n) largest |tau| (at least 1; ties at the threshold are all kept), zero the rest."""
    n = tau.numel()
    n_keep = min(n, max(1, round(k * n)))
    if n_keep == n:
        return tau.clone()
    threshold = tau.abs().flatten().kthvalue(n - n_keep + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))


# TIES-merging, Yadav et al. 2023 (arXiv 2306.01708): trim each task vector to its top-k magnitudes,
# elect per element the sign of the SUM of the trimmed task vectors (the sign with the larger total
# mass), then average only the trimmed values that agree with it ("disjoint mean"); elements where no
# value agrees (or the sum is 0) stay at the base.
@merge_method("ties", inputs="2+",
              params={"k": ParamSpec(0.2, "fraction of each task vector kept, by magnitude, per tensor",
                                     check=lambda v: 0.0 < v <= 1.0, valid="0 < k <= 1"),
                      "alpha": ALPHA_TASK},
              formula="base + alpha*disjoint_mean(trim_k(m_i - base)), sign elected by sum",
              description="TIES-merging (Yadav et al. 2023); the base model comes FIRST, then 1+ models.")
def ties(base: torch.Tensor, *models: torch.Tensor, k: float, alpha: float) -> torch.Tensor:
    trimmed = torch.stack([_trim_top_k(m - base, k) for m in models])
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (elected != 0)
    count = agree.sum(dim=0)
    total = torch.where(agree, trimmed, torch.zeros((), dtype=base.dtype, device=base.device)).sum(dim=0)
    merged = total / count.clamp_min(1).to(base.dtype)
    return base + alpha * merged


def key_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from the user's seed and the tensor name (stable across runs, platforms
    and thread order, unlike Python's hash())."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# DARE, Yu et al. 2023 (arXiv 2311.03099 "Language Models are Super Mario"): drop each element of the
# delta with probability p and rescale the survivors by 1/(1 - p). Used here in add-difference form
# (as sd-webui-model-mixer / Chattiori apply it to checkpoints): a + alpha * DARE(b - c).
# The mask comes from a CPU generator seeded by (seed, key), so it is the same on any device and in
# any thread order, and different keys get independent masks.
@merge_method("dare", inputs=3,
              params={"p": ParamSpec(0.5, "probability of dropping each element of b - c",
                                     check=lambda v: 0.0 <= v < 1.0, valid="0 <= p < 1"),
                      "alpha": ParamSpec(1.0, "multiplier of the rescaled sparse difference"),
                      "seed": ParamSpec(0, "random seed; combined with the tensor name", type=int)},
              formula="a + alpha * mask*(b - c)/(1 - p), mask ~ Bernoulli(1 - p) from (seed, key)",
              description="DARE drop-and-rescale (Yu et al. 2023) of b - c added onto a; p=0 is add_difference.")
def dare(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, p: float, alpha: float, seed: int,
         key: str = "") -> torch.Tensor:
    delta = b - c
    if p > 0.0:
        gen = torch.Generator(device="cpu").manual_seed(key_seed(seed, key))
        keep = torch.rand(delta.shape, generator=gen, dtype=torch.float32) >= p
        delta = torch.where(keep.to(delta.device), delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
        delta = delta / (1.0 - p)
    return a + alpha * delta


# Model Stock, Jang, Yun & Han 2024 (arXiv 2403.19522, ECCV 2024): per layer (here: per tensor),
# t = N*cos(theta) / (1 + (N - 1)*cos(theta)) with theta the angle between the fine-tuned task vectors
# m_i - base (for N > 2 the mean over all pairs, as fusion_bench documents); result =
# t*mean(m_i) + (1 - t)*base. A mean cosine <= 0 is taken as 0 (t = 0, keep the base): the formula
# has a pole at cos = -1/(N-1) and the paper assumes positively correlated fine-tunes.
@merge_method("model_stock", inputs="3+", formula="t*mean(m_i) + (1-t)*base, t = N*cos / (1 + (N-1)*cos)",
              description="Model Stock (Jang et al. 2024); base FIRST, then 2+ models fine-tuned from it.")
def model_stock(base: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
    n = len(models)
    taus = [(m - base).flatten() for m in models]
    cos = torch.stack([_flat_cos(x, y) for x, y in itertools.combinations(taus, 2)]).mean().clamp(0.0, 1.0)
    t = n * cos / (1 + (n - 1) * cos)
    mean = sum(models[1:], models[0].clone()) / n  # running sum: one extra tensor, not N
    return t * mean + (1 - t) * base


# --- LoRA merging (workbench/merge/lora.py): the second input is a LoRA exposed as ΔW per key -------
@merge_method("add_lora", inputs=2, params={"alpha": ParamSpec(1.0, "LoRA strength (multiplier of ΔW)")},
              formula="a + alpha*delta, delta = (lora_alpha/rank)*up@down of the LoRA (b)",
              description="Merge a LoRA (b: kohya or diffusers/PEFT file) into a at strength alpha.")
def add_lora(a: torch.Tensor, delta: torch.Tensor, *, alpha: float) -> torch.Tensor:
    return a + alpha * delta
