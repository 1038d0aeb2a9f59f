"""Shared fixtures: tiny real-layout checkpoints are built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist (`run.py test-fast`) the workers share the cores: give each its share of
# threads, or every torch op of every worker would start one thread per core and they would thrash.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Hash and config caches go to a per-session folder, never to the user's ~/.cache."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "wb-cache"))


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> dict[str, Path]:
    """Three different tiny SD1.5 checkpoints (A, B, C) for merge tests."""
    from workbench.testing import build_tiny

    d = tmp_path_factory.mktemp("sd15")
    return {name: build_tiny("sd15", d / f"{name}.safetensors", seed=seed)
            for name, seed in (("A", 1), ("B", 2), ("C", 3))}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch, seed=0) -> path, built once per (arch, seed) in the session."""
    from workbench.testing import build_tiny

    d = tmp_path_factory.mktemp("tiny")
    built: dict[tuple[str, int], Path] = {}

    def get(arch: str, seed: int = 0) -> Path:
        if (arch, seed) not in built:
            built[(arch, seed)] = build_tiny(arch, d / f"{arch}_{seed}.safetensors", seed=seed)
        return built[(arch, seed)]

    return get


@pytest.fixture(scope="session")
def tiny_sd3(tiny_model, tmp_path_factory):
    """tiny_sd3(variant) -> path: the tiny SD3.5 medium (= tiny_model("sd3")) or large checkpoint."""
    from workbench.testing import build_tiny

    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant == "sd3.5-medium":
            return tiny_model("sd3")
        if variant not in built:
            built[variant] = build_tiny("sd3", tmp_path_factory.mktemp("tiny_sd3") / f"{variant}.safetensors",
                                        variant=variant)
        return built[variant]

    return get


@pytest.fixture(scope="module")
def style_set(tmp_path_factory):
    """Four captioned images of the sample style set, for the training tests."""
    from workbench.testing.style_set import write_set

    return write_set(tmp_path_factory.mktemp("style"), count=4)
