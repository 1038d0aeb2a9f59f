"""Checkpoint merging: merge methods as small pure tensor functions registered by name.

`methods` holds the registry (`METHODS`, `get_method`, `validate_params`, `describe_methods`) and the
methods themselves; each works on one key's fp32 tensors. Reading inputs, choosing per-block alpha,
casting and writing the output belong to the executor.
"""

from workbench.merge.methods import (
    METHODS,
    REQUIRED,
    MergeMethod,
    ParamSpec,
    describe_methods,
    get_method,
    merge_method,
    validate_params,
)

__all__ = [
    "METHODS",
    "REQUIRED",
    "MergeMethod",
    "ParamSpec",
    "describe_methods",
    "get_method",
    "merge_method",
    "validate_params",
]
