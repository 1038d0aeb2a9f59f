"""A1111 sampler names -> diffusers schedulers.

Users know samplers by A1111's names ("DPM++ 2M Karras"); diffusers spells the same algorithms as
a scheduler class plus options. This table is that translation, used by every part that makes
images (generation, grids, training samples). Names without a faithful diffusers equivalent are
refused with the reason instead of silently swapped for something else.

Flow-matching models (SD3.x, FLUX.1) have their own schedulers: only the Euler and Heun
integrators exist there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.arch import ARCHS
from workbench.errors import UnsupportedError, WorkbenchError

FLOW_MATCHING_ARCHS = {a.id for a in ARCHS if a.flow_matching}  # workbench/arch.py


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class name and the options that make it the A1111 sampler."""

    cls: str
    options: dict[str, Any] = field(default_factory=dict)
    needs: str | None = None  # an extra Python package the scheduler imports


KARRAS = {"use_karras_sigmas": True}
SDE_2M = {"algorithm_type": "sde-dpmsolver++"}

SCHEDULERS: dict[str, SchedulerSpec] = {
    "Euler": SchedulerSpec("EulerDiscreteScheduler"),
    "Euler a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "LMS": SchedulerSpec("LMSDiscreteScheduler"),
    "LMS Karras": SchedulerSpec("LMSDiscreteScheduler", KARRAS),
    "Heun": SchedulerSpec("HeunDiscreteScheduler"),
    "DPM2": SchedulerSpec("KDPM2DiscreteScheduler"),
    "DPM2 Karras": SchedulerSpec("KDPM2DiscreteScheduler", KARRAS),
    "DPM2 a": SchedulerSpec("KDPM2AncestralDiscreteScheduler"),
    "DPM2 a Karras": SchedulerSpec("KDPM2AncestralDiscreteScheduler", KARRAS),
    "DPM++ 2M": SchedulerSpec("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": SchedulerSpec("DPMSolverMultistepScheduler", KARRAS),
    "DPM++ SDE": SchedulerSpec("DPMSolverSDEScheduler", needs="torchsde"),
    "DPM++ SDE Karras": SchedulerSpec("DPMSolverSDEScheduler", KARRAS, needs="torchsde"),
    "DPM++ 2M SDE": SchedulerSpec("DPMSolverMultistepScheduler", SDE_2M),
    "DPM++ 2M SDE Karras": SchedulerSpec("DPMSolverMultistepScheduler", {**SDE_2M, **KARRAS}),
    "DPM++ 3M SDE": SchedulerSpec("DPMSolverMultistepScheduler", {**SDE_2M, "solver_order": 3}),
    "DPM++ 3M SDE Karras": SchedulerSpec("DPMSolverMultistepScheduler",
                                         {**SDE_2M, "solver_order": 3, **KARRAS}),
    "DDIM": SchedulerSpec("DDIMScheduler"),
    "DDPM": SchedulerSpec("DDPMScheduler"),
    "PLMS": SchedulerSpec("PNDMScheduler"),
    "UniPC": SchedulerSpec("UniPCMultistepScheduler"),
    "LCM": SchedulerSpec("LCMScheduler"),
}
# A1111 names that diffusers has no faithful scheduler for, with the reason shown to the user.
UNAVAILABLE = {
    "DPM++ 2S a": "diffusers has no ancestral single-step DPM++ 2S scheduler",
    "DPM++ 2S a Karras": "diffusers has no ancestral single-step DPM++ 2S scheduler",
}
FLOW_SCHEDULERS = {
    "Euler": SchedulerSpec("FlowMatchEulerDiscreteScheduler"),
    "Heun": SchedulerSpec("FlowMatchHeunDiscreteScheduler"),
}


def scheduler_spec(name: str, arch: str = "sd15") -> SchedulerSpec:
    """The scheduler for an A1111 sampler name on `arch`, or a WorkbenchError saying why not."""
    table = FLOW_SCHEDULERS if arch in FLOW_MATCHING_ARCHS else SCHEDULERS
    if name in table:
        return table[name]
    if name in UNAVAILABLE:
        raise WorkbenchError(f"sampler {name!r}: {UNAVAILABLE[name]}; try 'DPM++ 2M Karras' or "
                             "'Euler a'")
    if arch in FLOW_MATCHING_ARCHS and name in SCHEDULERS:
        raise WorkbenchError(f"sampler {name!r} is not available for {arch} (a flow-matching "
                             f"model); use one of: {', '.join(FLOW_SCHEDULERS)}")
    raise WorkbenchError(f"unknown sampler {name!r}; expected one of: {', '.join(table)}")


def make_scheduler(name: str, base_config: dict, arch: str = "sd15"):
    """A diffusers scheduler for `name`, built from a pipeline's own scheduler config (so the
    model's beta schedule, prediction type and timestep spacing are kept)."""
    import importlib.util

    import diffusers

    spec = scheduler_spec(name, arch)
    if spec.needs and importlib.util.find_spec(spec.needs) is None:
        raise UnsupportedError(f"sampler {name!r} needs the Python package '{spec.needs}' "
                                f"(pip install {spec.needs}); or choose 'DPM++ 2M SDE Karras'")
    cls = getattr(diffusers, spec.cls)
    return cls.from_config(dict(base_config), **spec.options)
