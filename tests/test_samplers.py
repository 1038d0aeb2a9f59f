"""A1111 sampler names map to the diffusers schedulers that implement them."""

import diffusers
import pytest

from workbench.pipeline.samplers import SCHEDULERS, UNAVAILABLE, make_scheduler, scheduler_spec
from workbench.errors import UnsupportedError, WorkbenchError
from workbench.recipes.common import SAMPLERS

SD15_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1}


def test_recipes_accept_exactly_the_mapped_and_explained_samplers():
    assert set(SAMPLERS) == set(SCHEDULERS) | set(UNAVAILABLE)
    assert {"Euler a", "DPM++ 2M Karras", "DPM++ SDE Karras", "DDIM", "UniPC", "LCM"} <= set(SAMPLERS)


@pytest.mark.parametrize("name,cls,check", [
    ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "solver_order": 2,
                                                        "algorithm_type": "dpmsolver++"}),
    ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    ("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("UniPC", "UniPCMultistepScheduler", {}),
    ("DDIM", "DDIMScheduler", {}),
    ("LCM", "LCMScheduler", {}),
    ("PLMS", "PNDMScheduler", {}),
])
def test_scheduler_class_options_and_model_schedule_kept(name, cls, check):
    sched = make_scheduler(name, SD15_CONFIG)
    assert type(sched).__name__ == cls
    for key, value in check.items():
        assert sched.config[key] == value, key
    # the model's own schedule survives the switch
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.beta_end == 0.012


def test_flow_matching_models_take_only_their_integrators():
    cfg = {"num_train_timesteps": 1000, "shift": 3.0}
    assert type(make_scheduler("Euler", cfg, arch="flux")).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(WorkbenchError, match="not available for sd3"):
        scheduler_spec("DPM++ 2M Karras", arch="sd3")


def test_unavailable_and_missing_dependency_are_explained():
    with pytest.raises(WorkbenchError, match="no ancestral single-step"):
        scheduler_spec("DPM++ 2S a")
    try:
        import torchsde  # noqa: F401
    except ImportError:
        with pytest.raises(UnsupportedError, match="torchsde"):
            make_scheduler("DPM++ SDE Karras", SD15_CONFIG)
    with pytest.raises(WorkbenchError, match="unknown sampler"):
        scheduler_spec("Eulr")


def test_mapped_classes_exist_in_diffusers():
    for spec in SCHEDULERS.values():
        assert hasattr(diffusers, spec.cls), spec.cls
