"""Merge methods against their formulas, computed independently here (numpy, float64 where it helps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.merge import METHODS, ParamSpec, describe_methods, get_method, merge_method, validate_params
from workbench.merge import methods as M


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


A, B, C = rand(64, 33, seed=1), rand(64, 33, seed=2), rand(64, 33, seed=3)
a_np, b_np, c_np = A.numpy(), B.numpy(), C.numpy()


# ---------------------------------------------------------------- linear methods

@pytest.mark.parametrize("alpha", [0.3, 0.25, 0.7, 0.123])
def test_weighted_sum_bit_exact_and_not_lerp(alpha):
    out = get_method("weighted_sum")(A, B, alpha=alpha)
    expected = np.float32(1 - alpha) * a_np + np.float32(alpha) * b_np  # fp32 elementwise, IEEE
    assert out.dtype == torch.float32
    assert np.array_equal(out.numpy(), expected)
    # block_weighted is the same function with a per-key alpha from the executor
    assert torch.equal(get_method("block_weighted")(A, B, alpha=alpha), out)


def test_weighted_sum_differs_from_lerp_somewhere():
    # torch.lerp rounds differently from (1 - a)*A + a*B even in fp32; A1111 uses the formula, so
    # a bit-exact match with A1111 needs the formula, not lerp
    out = get_method("weighted_sum")(A, B, alpha=0.3)
    assert not torch.equal(out, torch.lerp(A, B, 0.3))


def test_weighted_sum_edges():
    ws = get_method("weighted_sum")
    assert torch.equal(ws(A, B, alpha=0.0), A)
    assert torch.equal(ws(A, B, alpha=1.0), B)
    assert torch.equal(ws(A, B, alpha=1), B)  # an int alpha is accepted as a number


def test_add_difference_triple_sum_sum_twice():
    out = get_method("add_difference")(A, B, C, alpha=0.7)
    np.testing.assert_array_equal(out.numpy(), a_np + np.float32(0.7) * (b_np - c_np))
    assert torch.equal(get_method("add_difference")(A, B, C, alpha=0.0), A)

    al, be = 0.2, 0.3
    out = get_method("triple_sum")(A, B, C, alpha=al, beta=be)
    ref = (1 - al - be) * a_np.astype(np.float64) + al * b_np.astype(np.float64) + be * c_np.astype(np.float64)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(get_method("triple_sum")(A, B, C, alpha=0.0, beta=0.0), A)

    out = get_method("sum_twice")(A, B, C, alpha=al, beta=be)
    a64, b64, c64 = (x.astype(np.float64) for x in (a_np, b_np, c_np))
    np.testing.assert_allclose(out.numpy(), (1 - be) * ((1 - al) * a64 + al * b64) + be * c64, rtol=1e-6, atol=1e-6)
    assert torch.equal(get_method("sum_twice")(A, B, C, alpha=1.0, beta=1.0), C)


def test_no_merge_copies():
    out = get_method("no_merge")(A)
    assert torch.equal(out, A) and out.data_ptr() != A.data_ptr()


# ---------------------------------------------------------------- supermerger calc modes

def test_train_difference_formula_and_hand_value():
    alpha = 0.6
    out = get_method("train_difference")(A, B, C, alpha=alpha)
    a64, b64, c64 = (x.astype(np.float64) for x in (a_np, b_np, c_np))
    dba, dbc = np.abs(b64 - a64), np.abs(b64 - c64)
    ref = a64 + 1.8 * alpha * (b64 - c64) * np.where(dba + dbc != 0, dba / (dba + dbc), 0.0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    # a=1, b=3, c=2: scale = |3-1| / (|3-1| + |3-2|) = 2/3; 1 + 1.8 * 1 * 2/3 = 2.2
    # a=b=c=5: 0/0 -> 0, result stays a
    t = get_method("train_difference")(torch.tensor([1.0, 5.0]), torch.tensor([3.0, 5.0]),
                                       torch.tensor([2.0, 5.0]), alpha=1.0)
    assert t[0].item() == pytest.approx(2.2, abs=1e-6)
    assert t[1].item() == 5.0 and not torch.isnan(t).any()
    # b == c everywhere: a unchanged
    assert torch.equal(get_method("train_difference")(A, B, B.clone(), alpha=1.0), A)


def _cos_cols(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * y).sum(0) / (np.linalg.norm(x, axis=0) * np.linalg.norm(y, axis=0))


def _cos_flat(x: np.ndarray, y: np.ndarray) -> float:
    return float((x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("variant", ["a", "b"])
def test_add_cosine_against_numpy(variant):
    a, b = A.numpy().astype(np.float64), (0.6 * A + 0.4 * B).numpy().astype(np.float64)
    if variant == "a":  # normalise along dim 0 first
        an, bn = a / np.linalg.norm(a, axis=0), b / np.linalg.norm(b, axis=0)
    else:
        an, bn = a, b
    sim = (_cos_cols(an, bn) + _cos_flat(an, bn)) / 2.0
    for alpha, lo, hi in [(0.1, 0.0, 1.0), (0.3, 0.2, 0.95), (-0.2, 0.5, 0.9)]:
        alpha_eff = abs(alpha) if variant == "a" else alpha
        k = np.clip((sim - lo) / (hi - lo) - alpha_eff, 0.0, 1.0)
        ref = k * a + (1 - k) * b  # k broadcasts over dim 0: share of a per column
        out = get_method(f"add_cosine_{variant}")(torch.from_numpy(a).float(), torch.from_numpy(b).float(),
                                                  alpha=alpha, sim_min=lo, sim_max=hi)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
    # identical tensors, alpha 0: similarity 1 -> k 1 -> a; huge alpha -> k 0 -> b
    assert torch.allclose(get_method(f"add_cosine_{variant}")(A, A.clone(), alpha=0.0), A)
    assert torch.equal(get_method(f"add_cosine_{variant}")(A, B, alpha=5.0), B)


def test_add_cosine_bias_and_scalar_shapes():
    for shape in [(7,), ()]:
        a, b = torch.randn(shape), torch.randn(shape)
        out = get_method("add_cosine_b")(a, b, alpha=0.0)
        assert out.shape == a.shape and torch.isfinite(out).all()
    with pytest.raises(WorkbenchError, match="sim_max"):
        get_method("add_cosine_a")(A, B, alpha=0.1, sim_min=0.5, sim_max=0.5)


def test_cosine_similarity_range_trims_percentiles():
    # 0..100: drop < p1 (=1), then > p99 of 1..100 (=99.5) -> range (1, 99); NaN ignored
    vals = np.concatenate([np.arange(101, dtype=np.float64), [np.nan]])
    assert M.cosine_similarity_range(vals) == (1.0, 99.0)
    assert M.cosine_similarity_range([torch.arange(101, dtype=torch.float32)]) == (1.0, 99.0)
    # Stage 0 values: variant "a" collects the column cosines, variant "b" the combined value
    combined_a, stage_a = M.cosine_similarity_values("a", A, B)
    combined_b, stage_b = M.cosine_similarity_values("b", A, B)
    np.testing.assert_allclose(stage_a.numpy(), _cos_cols(a_np.astype(np.float64), b_np.astype(np.float64)), atol=1e-5)
    assert torch.equal(stage_b, combined_b) and stage_a.shape == combined_a.shape == (33,)


# ---------------------------------------------------------------- slerp

def test_slerp_endpoints_and_right_angle():
    s = get_method("slerp")
    assert torch.equal(s(A, B, alpha=0.0), A)
    assert torch.equal(s(A, B, alpha=1.0), B)
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    half = s(e1, e2, alpha=0.5)
    assert torch.allclose(half, torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2), atol=1e-6)
    quarter = s(e1, e2, alpha=0.25)
    ang = math.pi / 8
    assert torch.allclose(quarter, torch.tensor([math.cos(ang), math.sin(ang), 0.0]), atol=1e-6)
    # norms are interpolated linearly: |a| = 2, |b| = 1 -> 1.5 at the midpoint
    mixed = s(2 * e1, e2, alpha=0.5)
    assert torch.allclose(mixed, 1.5 * torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2), atol=1e-6)
    # 2-D tensors are slerped as flattened vectors
    out = s(A, B, alpha=0.4)
    assert out.shape == A.shape
    na, nb = float(A.norm()), float(B.norm())
    assert float(out.norm()) == pytest.approx(0.6 * na + 0.4 * nb, rel=1e-5)


def test_slerp_colinear_and_zero_fallback():
    s = get_method("slerp")
    for b in (3 * A, -2 * A):  # parallel and antiparallel: plain weighted sum, bit-exact
        assert torch.equal(s(A, b, alpha=0.3), 0.7 * A + 0.3 * b)
    zero = torch.zeros_like(A)
    out = s(zero, B, alpha=0.3)
    assert torch.equal(out, 0.7 * zero + 0.3 * B) and torch.isfinite(out).all()
    assert torch.isfinite(s(zero, zero, alpha=0.5)).all()


# ---------------------------------------------------------------- TIES

def test_ties_hand_example():
    # task vectors (6 elements), k=0.5 keeps the 3 largest |tau| of each:
    # t1 = [ 4, -1,  2,  0.5, -3,  1  ] -> [4, 0, 2, 0, -3, 0]
    # t2 = [ 2,  3,  1, -0.25,-1,  5  ] -> [2, 3, 0, 0, 0, 5]
    # t3 = [ 1, -6, -2,  0.125, 2, -0.5] -> [0, -6, -2, 0, 2, 0]
    # sum        = [6, -3, 0, 0, -1, 5] -> elected sign [+, -, 0, 0, -, +]
    # disjoint mean: idx0 (4+2)/2 = 3; idx1 -6; idx2 sign 0 -> 0; idx3 0; idx4 -3; idx5 5
    base = torch.full((6,), 0.5)
    taus = [torch.tensor([4, -1, 2, 0.5, -3, 1]), torch.tensor([2, 3, 1, -0.25, -1, 5]),
            torch.tensor([1, -6, -2, 0.125, 2, -0.5])]
    models = [base + t for t in taus]
    merged = torch.tensor([3.0, -6.0, 0.0, 0.0, -3.0, 5.0])
    out = get_method("ties")(base, *models, k=0.5, alpha=1.0)
    assert torch.equal(out, base + merged)
    out = get_method("ties")(base, *models, k=0.5, alpha=0.5)
    assert torch.equal(out, base + 0.5 * merged)
    # k=1 keeps everything: idx3 sum 0.5-0.25+0.125 > 0 -> mean of 0.5 and 0.125
    full = get_method("ties")(base, *models, k=1.0)
    assert full[3].item() == pytest.approx(0.5 + (0.5 + 0.125) / 2)
    assert full[0].item() == pytest.approx(0.5 + (4 + 2 + 1) / 3)


def test_ties_default_k_and_single_model():
    base = torch.zeros(10)
    m = torch.arange(1.0, 11.0)
    # default k=0.2: the 2 largest of 10 survive
    out = get_method("ties")(base, m)
    assert torch.equal(out, torch.tensor([0.0] * 8 + [9.0, 10.0]))


# ---------------------------------------------------------------- DARE

def test_dare_determinism_and_keys():
    d = get_method("dare")
    a, b, c = rand(200, 50, seed=4), rand(200, 50, seed=5), rand(200, 50, seed=6)
    r1 = d(a, b, c, key="model.diffusion_model.out.0.weight", p=0.5, seed=7)
    r2 = d(a, b, c, key="model.diffusion_model.out.0.weight", p=0.5, seed=7)
    assert torch.equal(r1, r2)
    # another key (or seed) gives another mask, independent of call order
    other_key = d(a, b, c, key="model.diffusion_model.out.2.weight", p=0.5, seed=7)
    other_seed = d(a, b, c, key="model.diffusion_model.out.0.weight", p=0.5, seed=8)
    kept = lambda r: (r != a)  # noqa: E731  (b - c is nonzero almost surely)
    assert not torch.equal(kept(r1), kept(other_key))
    assert not torch.equal(kept(r1), kept(other_seed))
    assert torch.equal(d(a, b, c, key="model.diffusion_model.out.0.weight", p=0.5, seed=7), r1)
    # about 1 - p survive, rescaled by 1/(1 - p); the dropped ones keep a
    p = 0.3
    r = d(a, b, c, key="k", p=p, seed=1, alpha=0.8)
    mask = kept(r)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.03
    expected = a + 0.8 * (b - c) / (1 - p)
    assert torch.allclose(r[mask], expected[mask], rtol=1e-5, atol=1e-6)
    assert torch.equal(r[~mask], a[~mask])


def test_dare_p0_is_add_difference_and_seed_mixing():
    assert torch.equal(get_method("dare")(A, B, C, key="x", p=0.0, alpha=0.7),
                       get_method("add_difference")(A, B, C, alpha=0.7))
    assert M.key_seed(0, "a") != M.key_seed(0, "b") != M.key_seed(1, "b")
    assert M.key_seed(3, "k") == M.key_seed(3, "k") < 2**63


# ---------------------------------------------------------------- Model Stock

def test_model_stock_two_models_closed_form():
    base = rand(40, 20, seed=10)
    shared = rand(40, 20, seed=11)
    m1 = base + shared + 0.5 * rand(40, 20, seed=12)
    m2 = base + shared + 0.5 * rand(40, 20, seed=13)
    t1, t2 = ((m - base).numpy().astype(np.float64).ravel() for m in (m1, m2))
    cos = t1 @ t2 / (np.linalg.norm(t1) * np.linalg.norm(t2))
    t = 2 * cos / (1 + cos)
    assert 0.5 < cos < 1
    ref = t * (m1.numpy().astype(np.float64) + m2.numpy()) / 2 + (1 - t) * base.numpy()
    out = get_method("model_stock")(base, m1, m2)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_model_stock_three_models_and_opposed_vectors():
    base = rand(30, seed=20)
    ms = [base + rand(30, seed=21) + 0.3 * rand(30, seed=s) for s in (22, 23, 24)]
    taus = [(m - base).numpy().astype(np.float64) for m in ms]
    cos_pairs = [taus[i] @ taus[j] / (np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]))
                 for i, j in ((0, 1), (0, 2), (1, 2))]
    c = np.mean(cos_pairs)
    t = 3 * c / (1 + 2 * c)
    ref = t * np.mean([m.numpy() for m in ms], axis=0) + (1 - t) * base.numpy()
    np.testing.assert_allclose(get_method("model_stock")(base, *ms).numpy(), ref, rtol=1e-5, atol=1e-5)
    # task vectors pointing apart (cos < 0) -> t = 0 -> the base
    tau = rand(30, seed=25)
    assert torch.allclose(get_method("model_stock")(base, base + tau, base - tau), base)
    # identical fine-tunes (cos = 1) -> t = 1 -> the fine-tune
    assert torch.allclose(get_method("model_stock")(base, base + tau, base + tau), base + tau, atol=1e-6)


# ---------------------------------------------------------------- registry

def test_unknown_method_did_you_mean():
    with pytest.raises(WorkbenchError, match=r"unknown merge method 'weigthed_sum' \(did you mean 'weighted_sum'\?\)"):
        get_method("weigthed_sum")
    with pytest.raises(WorkbenchError, match="known methods: .*add_difference"):
        get_method("zzz")


def test_validate_params_errors():
    with pytest.raises(WorkbenchError, match=r"'weighted_sum': unknown parameter 'alhpa' \(did you mean 'alpha'\?\)"):
        validate_params("weighted_sum", {"alhpa": 0.5})
    with pytest.raises(WorkbenchError, match=r"missing required parameter 'alpha'"):
        validate_params("add_difference", {})
    with pytest.raises(WorkbenchError, match=r"parameter 'alpha' must be a number, got '0.5' \(str\)"):
        validate_params("weighted_sum", {"alpha": "0.5"})
    with pytest.raises(WorkbenchError, match=r"parameter 'alpha' must be a number, got True"):
        validate_params("weighted_sum", {"alpha": True})
    with pytest.raises(WorkbenchError, match=r"parameter 'seed' must be an integer"):
        validate_params("dare", {"seed": 1.5})
    with pytest.raises(WorkbenchError, match=r"parameter 'k' must satisfy 0 < k <= 1, got 0.0"):
        validate_params("ties", {"k": 0.0})
    with pytest.raises(WorkbenchError, match=r"parameter 'p' must satisfy 0 <= p < 1"):
        validate_params("dare", {"p": 1.0})
    with pytest.raises(WorkbenchError, match=r"'key' is reserved"):
        validate_params("dare", {"key": "x"})
    with pytest.raises(WorkbenchError, match="must be finite"):
        validate_params("weighted_sum", {"alpha": float("nan")})
    assert validate_params("dare", {}) == {"p": 0.5, "alpha": 1.0, "seed": 0}
    assert validate_params("weighted_sum", {"alpha": 1}) == {"alpha": 1.0}


def test_wrong_number_of_inputs():
    with pytest.raises(WorkbenchError, match=r"'add_difference' takes 3 inputs \(a, b, c\), got 2"):
        get_method("add_difference")(A, B, alpha=1.0)
    with pytest.raises(WorkbenchError, match=r"'model_stock' takes at least 3 inputs \(base, models\.\.\.\), got 2"):
        get_method("model_stock")(A, B)
    get_method("ties").check_inputs(5)  # variadic: more is fine


def test_registration_checks_signature():
    with pytest.raises(ValueError, match="declared params"):
        @merge_method("_bad_params", inputs=2, params={"alpha": ParamSpec(0.5, "x")}, description="", formula="")
        def _bad(a, b, *, beta):  # noqa: ANN001
            return a
    with pytest.raises(ValueError, match="does not match inputs"):
        @merge_method("_bad_inputs", inputs=3, description="", formula="")
        def _bad2(a, b):  # noqa: ANN001
            return a
    with pytest.raises(ValueError, match="registered twice"):
        merge_method("weighted_sum", inputs=2, description="", formula="")(lambda a, b: a)
    assert "_bad_params" not in METHODS and "_bad_inputs" not in METHODS


def test_describe_methods_lists_everything():
    text = describe_methods()
    expected = {"weighted_sum", "add_difference", "block_weighted", "triple_sum", "sum_twice",
                "train_difference", "add_cosine_a", "add_cosine_b", "ties", "dare", "slerp",
                "model_stock", "no_merge"}
    assert expected <= set(METHODS)
    for name, m in METHODS.items():
        assert f"\n{name}  inputs: {m.inputs_text}" in "\n" + text
        assert m.formula in text
    assert "- k (float, default 0.2, 0 < k <= 1)" in text
    assert "- alpha (float, required): share of b" in text
