"""sha256 / AutoV2 / A1111 legacy / addnet hashes and the hash cache."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from workbench.formats import hashes
from workbench.formats.hashes import a1111_legacy_hash, addnet_hash, autov2, sha256_file
from workbench.formats.writer import save_file_atomic


@pytest.fixture(autouse=True)
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


def test_known_bytes(tmp_path):
    data = bytes(range(256)) * 8192  # 2 MiB, so the legacy window (1 MiB + 64 KiB) is inside
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    full = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == full
    assert autov2(path) == full[:10]
    assert a1111_legacy_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_addnet_hash_ignores_metadata(tmp_path):
    t = {"w": torch.arange(64, dtype=torch.float32)}
    a = save_file_atomic(t, tmp_path / "a.safetensors", {"ss_output_name": "a"})
    b = save_file_atomic(t, tmp_path / "b.safetensors", {"ss_output_name": "something else"})
    raw = a.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert addnet_hash(a) == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert addnet_hash(a) == addnet_hash(b) and sha256_file(a) != sha256_file(b)


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    path = tmp_path / "m.bin"
    path.write_bytes(b"one")
    first = sha256_file(path)
    cache = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert cache["entries"][str(path.resolve())]["sha256"] == first
    calls = []
    real = hashes._sha256_range
    monkeypatch.setattr(hashes, "_sha256_range", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert sha256_file(path) == first and calls == []  # served from the cache, file not read
    path.write_bytes(b"two")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert sha256_file(path) == hashlib.sha256(b"two").hexdigest() and len(calls) == 1


def test_corrupt_cache_is_tolerated(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hashes.json").write_text("{not json")
    path = tmp_path / "m.bin"
    path.write_bytes(b"x")
    assert sha256_file(path) == hashlib.sha256(b"x").hexdigest()
    assert json.loads((tmp_path / "cache" / "hashes.json").read_text())["version"] == 1
