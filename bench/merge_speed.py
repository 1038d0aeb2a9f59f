"""Merge speed and memory: workbench against meh and sd-mecha, same inputs, same run.

    python bench/merge_speed.py                 # SD1.5 full size (3 × 2.13 GB inputs)
    python bench/merge_speed.py --arch sdxl     # SDXL full size (3 × 6.94 GB inputs)
    python bench/merge_speed.py --tiny          # tiny models: a smoke test of this script

Inputs are full-size checkpoints with the real key set and random fp16 weights
(workbench.testing.full_size). The page cache is warmed before timing. Each tool runs as its own
process; its process tree's memory is polled from /proc every 20 ms: peak RSS and peak anonymous
memory (RssAnon: file pages of memory-mapped inputs are page cache the kernel can drop; anonymous
memory is what pushes a machine into swap). Peers run from a separate virtual environment that the
product never imports (default bench/.peers-venv; see --peers).
Prints a table and writes JSON with wall-time and memory ratios against each peer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_SETUP = ("python3 -m venv bench/.peers-venv && bench/.peers-venv/bin/pip install torch==2.14.1 "
               "sd-meh==0.9.5 sd-mecha==1.1.8 tensordict scipy click tqdm safetensors")

MEH = """
import sys
from sd_meh.merge import merge_models, save_model
method, out, alpha, *paths = sys.argv[1:]
models = {"model_a": paths[0], "model_b": paths[1]}
if len(paths) > 2:
    models["model_c"] = paths[2]
a = float(alpha)
merged = merge_models(models, {"alpha": [a] * 25}, {"alpha": a}, method, precision=16, threads=1)
save_model(merged, out.removesuffix(".safetensors"), "safetensors")  # meh appends the suffix
"""

MECHA = """
import sys, torch, sd_mecha
method, out, alpha, *paths = sys.argv[1:-1]
models = [sd_mecha.model(p) for p in paths]
if method == "weighted_sum":
    r = sd_mecha.weighted_sum(models[0], models[1], alpha=float(alpha))
else:
    r = sd_mecha.add_difference(models[0], models[1], models[2], alpha=float(alpha))
sd_mecha.merge(r, output=out, threads=int(sys.argv[-1]), merge_dtype=torch.float32,
               output_dtype=torch.float16)
"""


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, RssAnon) in bytes summed over `pid` and its descendants."""
    pids, rss, anon = [pid], 0, 0
    while pids:
        p = pids.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children]
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("RssAnon:"):
                anon += int(line.split()[1]) * 1024
    return rss, anon


def measure(cmd: list[str], env: dict | None = None, timeout: float = 600) -> dict:
    """Run `cmd`, polling its memory; wall time, peaks and exit status (killed after `timeout`)."""
    start = time.perf_counter()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "merge_speed_tool.log", "w+b")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    peak_rss = peak_anon = 0
    while proc.poll() is None:
        if time.perf_counter() - start > timeout:
            proc.kill()
            proc.wait()
            break
        rss, anon = tree_memory(proc.pid)
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        time.sleep(0.02)
    wall = time.perf_counter() - start
    log.seek(0)
    out = log.read().decode(errors="replace")
    log.close()
    if proc.returncode != 0:
        print(out[-2000:], file=sys.stderr)
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(peak_rss / 2**30, 3),
            "peak_anon_gib": round(peak_anon / 2**30, 3), "rc": proc.returncode,
            **({"timed_out": True} if wall > timeout else {})}


def make_inputs(arch: str, folder: Path, tiny: bool) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from workbench.testing import build_tiny
    from workbench.testing.full_size import write_random

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, name in enumerate("ABC", start=1):
        p = folder / f"{arch}{'_tiny' if tiny else ''}_{name}.safetensors"
        if not p.exists():
            print(f"writing {p} ...", flush=True)
            build_tiny(arch, p, seed=seed) if tiny else write_random(p, arch, seed=seed)
        paths.append(p)
    return paths


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 * 2**20):
                pass


def our_command(method: str, out: Path, alpha: float, paths: list[Path], threads: int) -> list[str]:
    recipe = out.with_suffix(".yaml")
    names = "ABC"[: len(paths)]
    lines = ["kind: merge", "name: bench", "models:"]
    lines += [f"  {n}: {p}" for n, p in zip(names, paths)]
    lines += ["steps:", f"  - {{id: m, method: {method}, inputs: [{', '.join(names)}], alpha: {alpha}}}",
              f"output: {{path: {out}, dtype: fp16}}"]
    recipe.write_text("\n".join(lines) + "\n")
    driver = ("import sys; from workbench.recipes import load_recipe; from workbench.kinds import merge; "
              "merge.run(merge.describe(load_recipe(sys.argv[1]), overwrite=True), progress=False, threads=int(sys.argv[2]))")
    return [sys.executable, "-c", driver, str(recipe), str(threads)]


def max_abs_diff(a: Path, b: Path, keys: int = 40) -> float:
    """Largest |a - b| over a spread sample of keys (outputs of two tools)."""
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        names = sorted(set(fa.keys()) & set(fb.keys()))
        for k in names[:: max(1, len(names) // keys)]:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.is_floating_point() and x.shape == y.shape:
                worst = max(worst, (x.float() - y.float()).abs().max().item())
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wb-merge-bench"))
    ap.add_argument("--tiny", action="store_true", help="tiny models (checks the script, not speed)")
    ap.add_argument("--peers", default=str(ROOT / "bench" / ".peers-venv" / "bin" / "python"))
    ap.add_argument("--tools", default="ours,meh,mecha")
    ap.add_argument("--methods", default="weighted_sum,add_difference")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="our worker threads")
    ap.add_argument("--mecha-threads", type=int, default=0,
                    help="sd-mecha threads (0 = its main thread; with 2 threads sd-mecha 1.1.8 "
                         "stalled for minutes on the reference machine with torch 2.14)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before a run is killed")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    tools = args.tools.split(",")
    if any(t in tools for t in ("meh", "mecha")) and not Path(args.peers).exists():
        print(f"peer venv missing ({args.peers}); create it with:\n  {PEERS_SETUP}", file=sys.stderr)
        return 2
    inputs = make_inputs(args.arch, args.dir, args.tiny)
    warm(inputs)
    results: dict[str, dict] = {"arch": args.arch, "tiny": args.tiny, "input_bytes": inputs[0].stat().st_size,
                                "cpus": os.cpu_count(), "runs": {}}
    alphas = {"weighted_sum": 0.3, "add_difference": 1.0}
    for method in args.methods.split(","):
        paths = inputs[:2] if method == "weighted_sum" else inputs
        for tool in tools:
            out = args.dir / f"out_{tool}_{method}.safetensors"
            for r in range(args.repeat):
                out.unlink(missing_ok=True)
                warm(paths)
                if tool == "ours":
                    cmd = our_command(method, out, alphas[method], paths, args.threads)
                    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
                else:
                    script = MEH if tool == "meh" else MECHA
                    cmd = [args.peers, "-c", script, method, str(out), str(alphas[method]), *map(str, paths)]
                    if tool == "mecha":
                        cmd.append(str(args.mecha_threads))
                    env = None
                m = measure(cmd, env, args.timeout)
                results["runs"].setdefault(method, {}).setdefault(tool, []).append(m)
                print(f"{method:15s} {tool:6s} run {r + 1}: {m}", flush=True)
        if "ours" in tools:
            ours = args.dir / f"out_ours_{method}.safetensors"
            for peer in ("meh", "mecha"):
                other = args.dir / f"out_{peer}_{method}.safetensors"
                if peer in tools and ours.exists() and other.exists():
                    results["runs"][method][f"max_abs_diff_vs_{peer}"] = max_abs_diff(ours, other)
    summary = {}
    for method, runs in results["runs"].items():
        best = {t: min(v, key=lambda m: m["wall_s"]) for t, v in runs.items()
                if isinstance(v, list) and any(m["rc"] == 0 for m in v)}
        best = {t: min((m for m in runs[t] if m["rc"] == 0), key=lambda m: m["wall_s"]) for t in best}
        if "ours" not in best:
            continue
        for peer in ("meh", "mecha"):
            if peer in best:
                summary[f"{method}: wall ours/{peer}"] = round(best["ours"]["wall_s"] / best[peer]["wall_s"], 3)
                summary[f"{method}: anon ours/{peer}"] = round(
                    best["ours"]["peak_anon_gib"] / max(best[peer]["peak_anon_gib"], 1e-9), 3)
        summary[f"{method}: ours peak anon GiB"] = best["ours"]["peak_anon_gib"]
        summary[f"{method}: ours peak RSS GiB"] = best["ours"]["peak_rss_gib"]
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
