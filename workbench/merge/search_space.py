"""What a merge search varies, and the ordinary merge recipe each point of the search is.

A point is a dict {parameter name: value}: `alpha` (one α for every key), the four block groups
`BASE`, `IN`, `MID`, `OUT`, or one value per block id of the architecture (workbench/arch.py
`block_ids`, of which only the blocks the input file has are searched: formats/blocks.py). Every
point becomes a MergeRecipe (workbench/recipes/merge.py) with the same method, inputs and dtype, so
the in-memory preview (grid/merge_preview.py) and the recipe written for the best point are the
same merge.

Block groups: BASE is BASE (text encoders, VAE). On UNets (the table has M00) IN is every INnn, MID
is M00 and OUT every OUTnn. DiTs have no middle block: their diffusion blocks in table order
(IN, J00.. / D00.., S00.., OUT) are cut into thirds, the first third IN, the second MID, the last OUT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.formats.blocks import BLOCK_IDS, block_of
from workbench.formats.model_file import read_model_header
from workbench.recipes.merge import MergeRecipe

GROUPS = ("BASE", "IN", "MID", "OUT")


def block_groups(arch: str, ids: list[str] | None = None) -> dict[str, list[str]]:
    """{group: block ids} for `arch` (ids default to the architecture's whole table)."""
    ids = list(ids if ids is not None else BLOCK_IDS[arch])
    rest = [i for i in ids if i != "BASE"]
    if "M00" in rest:
        groups = {"BASE": ["BASE"], "IN": [i for i in rest if i.startswith("IN")], "MID": ["M00"],
                  "OUT": [i for i in rest if i.startswith("OUT")]}
    else:
        third = len(rest) / 3
        groups = {"BASE": ["BASE"], "IN": rest[:round(third)], "MID": rest[round(third):round(2 * third)],
                  "OUT": rest[round(2 * third):]}
    return {g: v for g, v in groups.items() if v}


def present_blocks(arch: str, path: Path) -> list[str]:
    """Block ids that hold at least one tensor of the file, in table order."""
    found = {block_of(arch, k) for k in read_model_header(path).tensors}
    return [i for i in BLOCK_IDS[arch] if i in found]


@dataclass(frozen=True)
class SearchSpace:
    """The parameters of one search, their bounds, and how a point maps to per-block α."""

    kind: str                    # "alpha" | "block_groups" | "blocks"
    arch: str
    low: float
    high: float
    names: tuple[str, ...]       # optuna parameter names
    members: dict[str, tuple[str, ...]]  # parameter -> the block ids it sets (empty for alpha)

    @classmethod
    def build(cls, kind: str, arch: str, first_input: Path, low: float = 0.0,
              high: float = 1.0) -> "SearchSpace":
        if arch not in BLOCK_IDS:
            raise WorkbenchError(f"space: no block table for architecture {arch!r}")
        if kind == "alpha":
            return cls(kind, arch, low, high, ("alpha",), {"alpha": ()})
        present = present_blocks(arch, first_input)
        if kind == "block_groups":
            groups = {g: tuple(b for b in ids if b in present)
                      for g, ids in block_groups(arch).items()}
            groups = {g: ids for g, ids in groups.items() if ids}
            return cls(kind, arch, low, high, tuple(groups), groups)
        if kind == "blocks":
            return cls(kind, arch, low, high, tuple(present), {b: (b,) for b in present})
        raise WorkbenchError(f"space: expected alpha, block_groups or blocks (got {kind!r})")

    def suggest(self, trial) -> dict[str, float]:
        """One point drawn by an optuna trial."""
        return {n: trial.suggest_float(n, self.low, self.high) for n in self.names}

    def blocks_of(self, point: dict[str, float]) -> dict[str, float] | None:
        """{block id: α} of a point (None for the single-α space)."""
        if self.kind == "alpha":
            return None
        return {b: float(point[n]) for n in self.names for b in self.members[n]}


def point_recipe(search, space: SearchSpace, point: dict[str, float], name: str,
                 output_path: Path) -> MergeRecipe:
    """The ordinary merge recipe of one point (weighted_sum / add_difference of the search's
    inputs), writing `output_path` when run."""
    models = {"A": search.inputs.A, "B": search.inputs.B}
    inputs = ["A", "B"]
    if search.method == "add_difference":
        models["C"] = search.inputs.C
        inputs.append("C")
    step: dict = {"id": "mix", "method": search.method, "inputs": inputs}
    blocks = space.blocks_of(point)
    if blocks is None:
        step["alpha"] = round(float(point["alpha"]), 6)
    else:
        # per-block α: weighted_sum's per-block form is block_weighted (blocks instead of alpha);
        # add_difference requires alpha, which a `blocks` table overrides key by key (merge/build.py)
        step["blocks"] = {b: round(v, 6) for b, v in blocks.items()}
        if search.method == "weighted_sum":
            step["method"] = "block_weighted"
        else:
            step["alpha"] = 1.0
    return MergeRecipe.model_validate({
        "name": name, "description": f"found by merge_search '{search.name}'",
        "models": {k: str(v) for k, v in models.items()}, "steps": [step],
        "output": {"path": str(output_path)}})


def input_recipe(search, which: str, output_path: Path) -> MergeRecipe:
    """Input A or B as a merge of A and B at α 0 / 1 (weighted_sum copies it exactly), so the
    inputs are previewed through the same pipeline as every trial."""
    alpha = {"A": 0.0, "B": 1.0}[which]
    return MergeRecipe.model_validate({
        "name": f"input-{which}", "models": {"A": str(search.inputs.A), "B": str(search.inputs.B)},
        "steps": [{"id": "mix", "method": "weighted_sum", "inputs": ["A", "B"], "alpha": alpha}],
        "output": {"path": str(output_path)}})
