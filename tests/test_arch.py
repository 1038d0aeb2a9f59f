"""workbench/arch.py: each architecture record is taken by every consumer that claims it, and no
other module keeps its own table keyed by architecture ids."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from helpers.formats_keys import open_clip, sd2_checkpoint, write_header_only
from workbench import arch as arch_module
from workbench.arch import ARCHS, BLOCK_TABLES, BY_ID, DIT_IDS, IDS, UNET_IDS
from workbench.errors import RecipeError, UnsupportedError, WorkbenchError
from workbench.formats.blocks import BLOCK_IDS, block_ids_for, keys_by_block
from workbench.formats.detect import detect
from workbench.formats.lora_keys import TE_SECTIONS, kohya_modules, module_table
from workbench.formats.safetensors_io import read_header

PACKAGE = Path(arch_module.__file__).parent
# header-only stand-ins for the architectures without a tiny builder (real key layout, no data)
HEADER_ONLY = {"sd2": sd2_checkpoint}


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    """A checkpoint file of `arch`: the tiny model, or a header-only file where there is none."""
    def get(arch: str) -> Path:
        record = BY_ID[arch]
        if record.tiny_builder:
            return tiny_model(arch)
        return write_header_only(tmp_path / f"{arch}.safetensors", HEADER_ONLY[arch]())
    return get


def test_records_are_consistent():
    assert IDS == ("sd15", "sd2", "sdxl", "sd3", "flux")
    assert set(UNET_IDS) | set(DIT_IDS) == set(IDS) and not set(UNET_IDS) & set(DIT_IDS)
    assert BLOCK_TABLES == ("sd15", "sdxl", "sd3", "flux")  # SD2 shares SD1.5's blocks
    for a in ARCHS:
        dit = a.family == "dit"
        assert a.denoiser == ("transformer" if dit else "unet"), a.id
        assert a.size_multiple == 8 * (2 if dit else 1) and a.native_side % a.size_multiple == 0, a.id
        assert a.components[0] == a.denoiser and a.components[-1] == "vae", a.id
        assert len({t.component for t in a.text_encoders}) == len(a.text_encoders), a.id
        assert a.block_ids[0] == "BASE" and len(set(a.block_ids)) == len(a.block_ids), a.id
        assert a.trainable <= a.generation and a.merge_preview <= a.generation, a.id
        assert a.text_encoder_trainable <= a.trainable, a.id
        assert (a.lora_modelspec_impl is not None) == a.trainable, a.id
        assert a.tiny_vae is None or a.latent_channels == 4, a.id  # TAESD/TAESDXL decode 4 channels
        assert a.images_per_call == (1 if a.guidance_distilled else 2)


@pytest.mark.slow
@pytest.mark.parametrize("arch", IDS)
def test_detection_gives_the_record(checkpoint, arch):
    record = BY_ID[arch]
    info = detect(checkpoint(arch))
    assert (info.arch, info.kind) == (arch, "checkpoint")
    # detect names the denoiser "unet" for both families; the text encoders by pipeline attribute
    assert info.components == {"unet", "vae", *(t.component for t in record.text_encoders)}
    assert not [n for n in info.notes if "latent channels" in n or "does not belong" in n], info.notes


@pytest.mark.parametrize("arch", IDS)
def test_tiny_builders_follow_the_record(arch):
    from workbench.testing import BUILDERS, builder_module

    record = BY_ID[arch]
    if record.tiny_builder is None:
        assert arch not in BUILDERS
        return
    assert BUILDERS[arch] == record.tiny_builder
    assert callable(builder_module(arch).build)


@pytest.mark.parametrize("arch", IDS)
def test_generation_sizes_and_plans(checkpoint, arch):
    from workbench.formats.pipeline_config import CONFIG_BUILDERS, config_files
    from workbench.pipeline import generate, load, sizes

    record = BY_ID[arch]
    assert generate.SIZE_MULTIPLE[arch] == record.size_multiple
    assert generate.NATIVE_SIDE[arch] == record.native_side
    assert sizes.COMPONENTS[arch] == record.components
    side = record.native_side
    expected = record.activation_bytes_per_px * (side // 8) ** 2 * record.images_per_call + 256 * sizes.MB
    assert sizes.activation_bytes(arch, side, side) == expected
    assert sizes.activation_bytes(arch, side, side) != sizes.activation_bytes("unknown", side, side)
    path = checkpoint(arch)
    found = sizes.component_sizes_from_header(path, arch)
    assert [c.name for c in found] == list(record.components)
    assert not any(c.estimated for c in found)  # every component was in the file, under its role
    if not record.generation:
        assert arch not in load.UNET_PIPELINES and arch not in load.DIT_ARCHS
        with pytest.raises(WorkbenchError, match="not a checkpoint that can make images"):
            generate.plan_for_file(path, device="cpu")
        return
    import diffusers

    loadable = load.UNET_PIPELINES if record.family == "unet" else dict.fromkeys(load.DIT_ARCHS)
    assert arch in loadable and record.pipeline_class in dir(diffusers)  # lazy: nothing imported
    assert load.UNET_PIPELINES.get(arch, record.pipeline_class) == record.pipeline_class
    assert config_files(path, arch) and arch in CONFIG_BUILDERS
    plan = generate.plan_for_file(path, device="cpu")
    assert plan.arch == arch and plan.names == list(record.components)
    assert (plan.width, plan.height) == (side, side)


@pytest.mark.parametrize("model,layers,width", [("clip_h", 24, 1024), ("clip_g", 32, 1280)])
def test_standard_text_encoder_sizes_count_the_real_layout(model, layers, width):
    """The assumed sizes of missing OpenCLIP encoders equal the parameter count of the real key
    layout (tests/helpers/formats_keys.py; minus logit_scale, which is no layer)."""
    from workbench.pipeline.sizes import STANDARD

    shapes = open_clip("cond_stage_model.model.", layers, width)
    count = sum(math.prod(s) for k, s in shapes.items() if not k.endswith("logit_scale"))
    assert STANDARD[model][:2] == (count, layers)


def test_samplers_follow_flow_matching():
    from workbench.pipeline.samplers import FLOW_SCHEDULERS, scheduler_spec

    for a in ARCHS:
        if a.flow_matching:
            assert scheduler_spec("Euler", a.id) == FLOW_SCHEDULERS["Euler"]
            with pytest.raises(WorkbenchError, match="flow-matching"):
                scheduler_spec("Euler a", a.id)
        else:
            assert scheduler_spec("Euler a", a.id).cls.startswith("EulerAncestral")


@pytest.mark.parametrize("arch", IDS)
def test_blocks_and_lora_names(checkpoint, arch):
    record = BY_ID[arch]
    keys = read_header(checkpoint(arch)).keys()
    assert BLOCK_IDS[arch] == list(record.block_ids)
    groups = keys_by_block(arch, keys)  # raises when a diffusion key belongs to no block
    assert groups["BASE"] and set(block_ids_for(arch, keys)) <= set(record.block_ids)
    table = module_table(arch, read_header(checkpoint(arch)).shapes())
    assert [s.diffusers[0] for s in TE_SECTIONS[arch]] == [t.component for t in record.text_encoders]
    assert table.components == {"unet", *(t.lora_component for t in record.text_encoders)}
    names = kohya_modules(table, {"unet", "text_encoder"})
    for t in record.text_encoders:
        assert any(n.startswith(t.kohya[0] + "_") for n in names), (arch, t.kohya[0])


@pytest.mark.parametrize("arch", IDS)
def test_training_takes_exactly_the_trainable_records(checkpoint, arch):
    from workbench.train.network import plan_network
    from workbench.train.setup import SUPPORTED, base_arch

    record = BY_ID[arch]
    path = checkpoint(arch)
    shapes = read_header(path).shapes()
    assert (arch in SUPPORTED) == record.trainable
    if not record.trainable:
        with pytest.raises(UnsupportedError):
            base_arch(path)
        with pytest.raises(UnsupportedError):
            plan_network(arch, shapes)
        return
    assert base_arch(path) == arch
    assert plan_network(arch, shapes, rank=4).modules
    if record.text_encoder_trainable:
        plan = plan_network(arch, shapes, rank=4, train_text_encoder=True)
        assert any(c.startswith("text_encoder") for c in plan.count())
    else:
        with pytest.raises(RecipeError, match="train_text_encoder"):
            plan_network(arch, shapes, rank=4, train_text_encoder=True)


@pytest.mark.parametrize("arch", IDS)
def test_merge_preview_takes_exactly_the_preview_records(arch):
    from workbench.grid.merge_preview import PREVIEW_ARCHS, load_into_pipeline

    record = BY_ID[arch]
    assert (arch in PREVIEW_ARCHS) == record.merge_preview
    if not record.merge_preview:
        with pytest.raises(UnsupportedError, match="merge preview"):
            load_into_pipeline(None, {}, arch, Path("unused.safetensors"))


def test_metadata_tables_name_every_record():
    from workbench.merge import extract, metadata
    from workbench.pipeline.tiny_vae import TINY_VAE_ARCHS
    from workbench.train import export

    for a in ARCHS:
        assert metadata.MODELSPEC_ARCH[a.id] == a.modelspec_arch
        assert extract.BASE_MODEL_VERSION[a.id] == a.kohya_base_model_version
        assert extract.NETWORK_MODULE[a.id] == a.kohya_network_module
        assert (a.id in export.MODELSPEC_ARCH) == a.trainable == (a.id in export.MODELSPEC_IMPL)
        assert (a.id in TINY_VAE_ARCHS) == (a.tiny_vae is not None)


def test_grid_estimate_and_dashboard_list_every_record():
    from workbench.app.views import merge as merge_view
    from workbench.kinds.grid import ARCH_FACTOR

    for a in ARCHS:
        assert ARCH_FACTOR[a.id] == a.grid_speed
        # the block editor offers one architecture per block table; every record's table is there
        same_blocks = [b for b in merge_view.ARCHS if BLOCK_IDS[b] == list(a.block_ids)]
        assert len(same_blocks) == 1, a.id


# ----------------------------------------------------------------------- one home for per-arch facts

ALLOWED = {PACKAGE / "arch.py",  # and data files (JSON/YAML), which the scan does not read
           # the tiny GGUF writer's per-architecture test layouts (test builders, not product facts)
           PACKAGE / "testing" / "gguf_files.py"}


def _arch_keyed_dicts(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """`file:line` of each dict literal whose string keys include at least 3 architecture ids."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if len(keys & set(IDS)) >= 3:
                found.append(f"{path.relative_to(root).as_posix()}:{node.lineno}")
    return found


def test_the_scan_finds_a_table_keyed_by_architecture(tmp_path):
    sample = tmp_path / "workbench" / "sample.py"
    sample.parent.mkdir()
    sample.write_text('X = {"sd15": 1, "sdxl": 2, "flux": 3}\nY = {"sd15": 1, "sd2": 2, "other": 3}\n'
                      'Z = {a: 1 for a in ("sd15", "sdxl", "flux")}\n')
    assert _arch_keyed_dicts(sample, tmp_path) == ["workbench/sample.py:1"]


@pytest.mark.slow
def test_no_module_keeps_its_own_architecture_table():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path not in ALLOWED
             for hit in _arch_keyed_dicts(path)]
    assert found == [], ("per-architecture tables outside workbench/arch.py; derive them from "
                         f"arch.ARCHS: {found}")


def test_arch_sits_on_the_ground_floor():
    tree = ast.parse((PACKAGE / "arch.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("workbench")} <= {"workbench.errors"}
