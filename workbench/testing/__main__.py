"""`python -m workbench.testing ARCH OUT.safetensors [--seed N] [--dtype fp16|bf16|fp32]`."""

from __future__ import annotations

import argparse
import sys

from workbench.errors import WorkbenchError
from workbench.testing import BUILDERS, build_tiny

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.testing",
                                     description="Write a tiny checkpoint with the real key layout.")
    parser.add_argument("arch", choices=sorted(BUILDERS))
    parser.add_argument("out", help="output .safetensors path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    args = parser.parse_args(argv)
    import torch

    try:
        path = build_tiny(args.arch, args.out, seed=args.seed, dtype=getattr(torch, DTYPES[args.dtype]))
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
