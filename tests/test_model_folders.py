"""An existing A1111 / Forge / ComfyUI install, used in place: its model folders by kind (layouts
and ComfyUI's extra_model_paths.yaml), the scan and the dashboard config built on them, hashes that
fill in after the listing, and finished models put where the tool lists them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from helpers.formats_keys import flux, hf_clip, ldm_vae, sd15_checkpoint, write_header_only
from workbench.app.config import AppConfig
from workbench.app.tool_outputs import ToolPublisher, result_models
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.formats import model_folders
from workbench.formats.hash_fill import HashFiller
from workbench.formats.model_folders import A1111, COMFYUI, find_install, publish
from workbench.formats.scan import apply_hashes, hash_targets, scan_install
from workbench.jobs.store import JobStore


@pytest.fixture(autouse=True)
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


def tiny(shapes):
    return {k: (2,) for k in shapes}


def lora_keys():
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    return {f"{m}.lora_down.weight": (8, 768), f"{m}.lora_up.weight": (320, 8), f"{m}.alpha": ()}


def forge_package(root: Path) -> Path:
    """Forge's one-click package: the install lives in webui/."""
    m = root / "webui" / "models"
    for d in ("Stable-diffusion", "Lora", "LyCORIS", "VAE", "text_encoder", "ControlNet"):
        (m / d).mkdir(parents=True)
    write_header_only(m / "Stable-diffusion" / "dreamy.safetensors", tiny(sd15_checkpoint()))
    write_header_only(m / "Stable-diffusion" / "flux1-dev-transformer.safetensors",
                      tiny(flux(prefix="")))
    write_header_only(m / "Lora" / "style.safetensors", lora_keys())
    write_header_only(m / "LyCORIS" / "loha.safetensors", lora_keys())
    write_header_only(m / "VAE" / "vae.safetensors", tiny(ldm_vae("")))
    write_header_only(m / "text_encoder" / "clip_l.safetensors", tiny(hf_clip("")))
    (m / "Stable-diffusion" / "old.ckpt").write_bytes(b"not read")
    (m / "Stable-diffusion" / "flux1-dev-Q4_K_S.gguf").write_bytes(b"GGUF" + bytes(60))
    (m / "ControlNet" / "cn.safetensors").write_bytes(b"")  # a kind we do not list
    return root / "webui"


def test_forge_layout_by_kind(tmp_path):
    base = forge_package(tmp_path / "forge")
    install = find_install(tmp_path / "forge")
    assert (install.tool, install.root) == (A1111, base.resolve())
    m = base.resolve() / "models"
    assert install.of("checkpoint") == [m / "Stable-diffusion"]
    assert install.of("lora") == [m / "Lora", m / "LyCORIS"]
    assert install.of("vae") == [m / "VAE"] and install.of("text_encoder") == [m / "text_encoder"]
    assert install.of("diffusion_model") == [] and install.of("embedding") == []
    # UNet/DiT-only files go where Forge lists them: its checkpoint folder
    assert install.target("diffusion_model") == m / "Stable-diffusion"
    assert install.kind_of(m / "LyCORIS" / "loha.safetensors") == "lora"
    assert install.kind_of(m / "ControlNet" / "cn.safetensors") is None
    # the models folder itself also finds the install
    assert find_install(m).root == base.resolve()


def test_scan_install_lists_files_by_folder_kind(tmp_path):
    forge_package(tmp_path / "forge")
    entries = scan_install(find_install(tmp_path / "forge"), with_hash=False)
    by = {e.path: e for e in entries}
    assert sorted(by) == sorted(f"models/{p}" for p in (
        "Stable-diffusion/dreamy.safetensors", "Stable-diffusion/flux1-dev-transformer.safetensors",
        "Stable-diffusion/old.ckpt", "Stable-diffusion/flux1-dev-Q4_K_S.gguf",
        "Lora/style.safetensors", "LyCORIS/loha.safetensors", "VAE/vae.safetensors",
        "text_encoder/clip_l.safetensors"))
    assert [e.folder for e in entries][:4] == ["checkpoint"] * 4  # checkpoints first
    dreamy = by["models/Stable-diffusion/dreamy.safetensors"]
    assert (dreamy.folder, dreamy.arch, dreamy.kind) == ("checkpoint", "sd15", "checkpoint")
    flux_file = by["models/Stable-diffusion/flux1-dev-transformer.safetensors"]
    assert (flux_file.arch, flux_file.kind) == ("flux", "transformer")
    assert by["models/LyCORIS/loha.safetensors"].folder == "lora"
    assert by["models/text_encoder/clip_l.safetensors"].kind == "text_encoder"
    assert by["models/Stable-diffusion/old.ckpt"].unsafe
    assert by["models/Stable-diffusion/flux1-dev-Q4_K_S.gguf"].error  # a stand-in without a GGUF header
    assert all(e.short_hash is None for e in entries)


def comfy_portable(root: Path) -> Path:
    c = root / "ComfyUI"
    for d in ("checkpoints", "unet", "diffusion_models", "loras", "vae", "clip", "text_encoders"):
        (c / "models" / d).mkdir(parents=True)
    write_header_only(c / "models" / "unet" / "flux1-schnell.safetensors",
                      tiny(flux(prefix="", guidance=False)))
    write_header_only(c / "models" / "clip" / "clip_l.safetensors", tiny(hf_clip("")))
    return c


def test_comfyui_extra_model_paths(tmp_path, monkeypatch):
    comfy = comfy_portable(tmp_path / "ComfyUI_windows_portable")
    a1111 = tmp_path / "sd" / "stable-diffusion-webui"
    for d in ("models/Stable-diffusion", "models/Lora", "models/LyCORIS", "models/VAE"):
        (a1111 / d).mkdir(parents=True)
    shared = tmp_path / "shared-models"
    (shared / "loras").mkdir(parents=True)
    (shared / "checkpoints").mkdir()
    monkeypatch.setenv("SHARED_MODELS", str(shared))
    # the format of ComfyUI's example file: sections with base_path, `|` blocks of folders,
    # is_default, kinds this project does not read
    (comfy / "extra_model_paths.yaml").write_text(
        "a111:\n"
        "    base_path: ../../sd/stable-diffusion-webui/\n"
        "\n"
        "    checkpoints: models/Stable-diffusion\n"
        "    vae: models/VAE\n"
        "    loras: |\n"
        "         models/Lora\n"
        "         models/LyCORIS\n"
        "    upscale_models: |\n"
        "                  models/ESRGAN\n"
        "    embeddings: embeddings\n"
        "    controlnet: models/ControlNet\n"
        "\n"
        "shared:\n"
        "    base_path: $SHARED_MODELS\n"
        "    is_default: true\n"
        "    checkpoints: checkpoints/\n"
        "    loras: loras\n"
        "    clip: missing-folder\n"
        "\n"
        "#comfyui:\n"
        "#     base_path: path/to/comfyui/\n"
        "empty_section:\n", encoding="utf-8")
    install = find_install(tmp_path / "ComfyUI_windows_portable")
    assert (install.tool, install.root) == (COMFYUI, comfy.resolve())
    m = comfy.resolve() / "models"
    a = a1111.resolve() / "models"
    assert install.of("checkpoint") == [shared / "checkpoints", m / "checkpoints",
                                        a / "Stable-diffusion"]
    assert install.of("lora") == [shared / "loras", m / "loras", a / "Lora", a / "LyCORIS"]
    assert install.of("diffusion_model") == [m / "diffusion_models", m / "unet"]
    assert install.of("text_encoder") == [m / "text_encoders", m / "clip"]
    assert install.of("vae") == [m / "vae", a / "VAE"]
    assert install.target("lora") == shared / "loras"  # is_default comes first
    assert "a111.upscale_models" in install.ignored and "a111.controlnet" in install.ignored
    assert any(i.startswith("shared.clip") and "missing" in i for i in install.ignored)
    assert any(i.startswith("a111.embeddings") for i in install.ignored)  # folder absent
    assert "ComfyUI install at" in install.describe()
    # files outside the install root are listed with their full path
    write_header_only(a / "Lora" / "far.safetensors", lora_keys())
    entries = {e.path: e for e in scan_install(install, with_hash=False)}
    assert entries[(a / "Lora" / "far.safetensors").as_posix()].folder == "lora"
    assert entries["models/unet/flux1-schnell.safetensors"].folder == "diffusion_model"
    # the YAML file alone also works
    only = find_install(comfy / "extra_model_paths.yaml")
    assert only.of("vae") == [a / "VAE"]


def test_a_folder_listed_twice_is_scanned_once(tmp_path):
    comfy = comfy_portable(tmp_path)
    (comfy / "extra_model_paths.yaml").write_text(
        "again:\n  base_path: models\n  clip: clip\n  text_encoders: |\n    clip\n    ./clip/\n")
    install = find_install(comfy)
    assert install.of("text_encoder") == [comfy.resolve() / "models" / "text_encoders",
                                          comfy.resolve() / "models" / "clip"]
    names = [e.path for e in scan_install(install, with_hash=False)]
    assert names.count("models/clip/clip_l.safetensors") == 1


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "expected sections"),
    ("a111:\n  - models\n", "section 'a111': expected base_path"),
    ("a111:\n  base_path: .\n  loras: [models/Lora]\n", "loras: expected a folder, or several"),
    ("a111:\n  base_path: [x]\n", "base_path must be a folder name"),
    ("a111: {loras: [\n", "not valid YAML"),
])
def test_bad_extra_model_paths_name_file_section_and_key(tmp_path, text, message):
    comfy = comfy_portable(tmp_path)
    (comfy / "extra_model_paths.yaml").write_text(text)
    with pytest.raises(WorkbenchError, match="extra_model_paths.yaml") as e:
        find_install(comfy)
    assert message in str(e.value)


def test_not_an_install(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(WorkbenchError, match=r"not an A1111, Forge or ComfyUI install: expected "
                       r"models/Stable-diffusion/"):
        find_install(tmp_path / "random")
    with pytest.raises(WorkbenchError, match="no such folder"):
        find_install(tmp_path / "nope")


# --------------------------------------------------------------------------------------------------
# hashes fill in after the listing


def test_hash_filler_background_and_cache(tmp_path):
    base = forge_package(tmp_path / "forge")
    install = find_install(tmp_path / "forge")
    entries = scan_install(install, with_hash=False)
    targets = hash_targets(entries, install.root)
    assert len(targets) == 6  # safetensors only: not the pickle, not the GGUF file
    filler = HashFiller()
    assert filler.known(targets) == {}
    assert filler.add(targets) == 6 and filler.add(targets) == 0  # queued once
    assert filler.start()
    deadline = time.monotonic() + 120
    while filler.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert filler.pending == 0 and filler.wait(120)
    assert filler.done_bytes == filler.total_bytes == sum(p.stat().st_size for p in targets)
    assert apply_hashes(entries, install.root, filler.hashes) == 0
    dreamy = base / "models" / "Stable-diffusion" / "dreamy.safetensors"
    expected = hashlib.sha256(dreamy.read_bytes()).hexdigest()
    assert filler.hashes[dreamy.resolve()] == expected
    # a new filler (another listing, another process) finds them in the cache, reading nothing
    again = HashFiller()
    assert again.known(targets) == filler.hashes and again.add(targets) == 0
    # a file that vanished is reported, not fatal
    gone = tmp_path / "gone.safetensors"
    gone.write_bytes(b"x" * 10)
    again.add([gone])
    gone.unlink()
    again.run()
    assert gone in again.errors and again.pending == 0
    assert again.add([gone]) == 0  # not retried on every redraw...
    again.forget_errors()
    assert again.add([gone]) == 1  # ...but after a Rescan


def test_cli_scan_tool_json_has_folder_kinds_and_hashes(tmp_path, capsys):
    base = forge_package(tmp_path / "forge")
    assert main(["models", "scan", "--tool", str(tmp_path / "forge"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "A1111/Forge install at" in captured.err
    rows = {r["path"]: r for r in json.loads(captured.out)}
    row = rows["models/Lora/style.safetensors"]
    data = (base / "models" / "Lora" / "style.safetensors").read_bytes()
    assert row["folder"] == "lora" and row["short_hash"] == hashlib.sha256(data).hexdigest()[:10]
    assert rows["models/Stable-diffusion/old.ckpt"]["short_hash"] is None
    # a table (stdout is not a terminal here: the table comes once, complete)
    assert main(["models", "scan", "--tool", str(tmp_path / "forge")]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["folder", "path", "kind"]
    assert "pickle: convert with `workbench convert`" in table
    assert main(["models", "scan"]) == 2
    assert "give a folder DIR or --tool ROOT" in capsys.readouterr().err
    assert main(["models", "scan", "--tool", str(tmp_path)]) == 2


# --------------------------------------------------------------------------------------------------
# the dashboard config and finished models put into the tool's folders


def test_app_config_tools(tmp_path):
    forge_package(tmp_path / "forge")
    cfg = AppConfig(home=tmp_path, tools=[tmp_path / "forge"])
    lora = (tmp_path / "forge" / "webui" / "models" / "Lora").resolve()
    assert lora in cfg.roots["models"] and cfg.roots["models"][0] == tmp_path.resolve() / "models"
    assert cfg.check(lora / "style.safetensors", ("models",)) == lora / "style.safetensors"
    again = AppConfig.from_json(cfg.to_json())
    assert again.roots == cfg.roots and again.tools == cfg.tools
    (tmp_path / "wb.yaml").write_text("tools: forge\noutput_to_tool_folders: true\n")
    from_file = AppConfig.from_file(tmp_path / "wb.yaml")
    assert from_file.tools == [(tmp_path / "forge").resolve()] and from_file.output_to_tool_folders
    (tmp_path / "bad.yaml").write_text("output_to_tool_folders: yes please\n")
    with pytest.raises(WorkbenchError, match="expected true or false"):
        AppConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(WorkbenchError, match="needs an install"):
        AppConfig(home=tmp_path, output_to_tool_folders=True)
    with pytest.raises(WorkbenchError, match="not an A1111, Forge or ComfyUI install"):
        AppConfig(home=tmp_path, tools=[tmp_path])


def test_cli_app_tool_flags(tmp_path, monkeypatch):
    import workbench.app

    forge_package(tmp_path / "forge")
    seen = []
    monkeypatch.setattr(workbench.app, "launch", lambda **kw: seen.append(kw) or 0)
    assert main(["app", "--home", str(tmp_path), "--tool", str(tmp_path / "forge"),
                 "--output-to-tool-folders", "--no-browser"]) == 0
    cfg = seen[-1]["config"]
    assert cfg.tools == [(tmp_path / "forge").resolve()] and cfg.output_to_tool_folders
    assert main(["app", "--home", str(tmp_path), "--output-to-tool-folders"]) == 2


def test_publish_links_never_replaces_and_falls_back_to_copies(tmp_path, monkeypatch):
    forge_package(tmp_path / "forge")
    install = find_install(tmp_path / "forge")
    lora_dir = install.target("lora")
    src = tmp_path / "out" / "new-style.safetensors"
    src.parent.mkdir()
    write_header_only(src, lora_keys())
    target = publish(src, install, "lora")
    assert target == lora_dir / "new-style.safetensors"
    assert os.path.samefile(src, target)  # a hard link: no second copy
    assert publish(src, install, "lora") is None  # already there: left alone
    # another volume: os.link fails across it, the copy goes through a temp name
    real_link = os.link
    calls = []

    def cross_device(a, b):
        calls.append((Path(a), Path(b)))
        if len(calls) == 1:
            raise OSError(18, "Invalid cross-device link")
        return real_link(a, b)

    monkeypatch.setattr(model_folders.os, "link", cross_device)
    src2 = src.with_name("second.safetensors")
    shutil.copy(src, src2)
    copied = publish(src2, install, "lora")
    assert copied == lora_dir / "second.safetensors" and copied.read_bytes() == src2.read_bytes()
    assert not os.path.samefile(src2, copied) and calls[1][1] == copied
    # no hard links at all (FAT/exFAT): check, then rename
    monkeypatch.setattr(model_folders.os, "link", lambda a, b: (_ for _ in ()).throw(
        OSError(1, "Operation not permitted")))
    src3 = src.with_name("third.safetensors")
    shutil.copy(src, src3)
    assert publish(src3, install, "lora").read_bytes() == src3.read_bytes()
    existing = lora_dir / "style.safetensors"
    before = existing.read_bytes()
    clash = src.with_name("style.safetensors")
    clash.write_bytes(b"different")
    assert publish(clash, install, "lora") is None and existing.read_bytes() == before
    assert not [p for p in lora_dir.iterdir() if p.name.endswith(".tmp")]
    # an install without a folder of that kind
    assert publish(src, install, "embedding") is None


def test_finished_jobs_are_put_into_the_tool_folders(tmp_path, tiny_sd15):
    forge_package(tmp_path / "forge")
    install = find_install(tmp_path / "forge")
    out = tmp_path / "outputs"
    (out / "lora").mkdir(parents=True)
    merged = out / "merged.safetensors"
    shutil.copy(tiny_sd15["A"], merged)
    lora = out / "lora" / "mine.safetensors"
    write_header_only(lora, lora_keys())
    (out / "lora" / "mine.json").write_text('{"activation text": "mystyle"}')
    step = out / "lora" / "mine-step00000100.safetensors"
    shutil.copy(lora, step)
    assert result_models([str(lora), str(step), str(out / "lora" / "loss.csv")]) == [lora]
    store = JobStore(tmp_path / "jobs.sqlite")
    since = time.time() - 1
    ids = {}
    for kind, results in (("merge", [merged, merged.with_suffix(".provenance.json")]),
                          ("train", [lora, step, out / "lora" / "mine.json"]),
                          ("generate", [merged])):
        ids[kind] = store.submit(kind, f"kind: {kind}\n", name=kind)
        job = store.claim(pid=os.getpid())
        store.finish(job.id, "done", [str(p) for p in results])
    lines = ToolPublisher(store, [install], since=since).poll()
    models = install.root / "models"
    assert (models / "Stable-diffusion" / "merged.safetensors").read_bytes() == merged.read_bytes()
    assert (models / "Lora" / "mine.safetensors").is_file()
    assert json.loads((models / "Lora" / "mine.json").read_text()) == \
        {"activation text": "mystyle"}
    assert not (models / "Lora" / step.name).exists()
    assert len(lines) == 3 and all(line.startswith(("job #1", "job #2")) for line in lines)
    assert any("put into A1111/Forge" in ln for ln in store.log_tail(ids["train"]))
    # a second dashboard session: the files are there, nothing is replaced, it says so
    again = ToolPublisher(store, [install], since=since).poll()
    assert again and all("already exists, not replaced" in ln for ln in again)
    # jobs that finished before the dashboard started are not touched
    assert ToolPublisher(store, [install], since=time.time() + 60).poll() == []


def test_models_page_lists_the_install_at_once_and_fills_in_hashes(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from workbench.app.config import ENV

    base = forge_package(tmp_path / "forge")
    (tmp_path / "models").mkdir()
    write_header_only(tmp_path / "models" / "mine.safetensors", tiny(sd15_checkpoint()))
    cfg = AppConfig(home=tmp_path, spawn_workers=False, tools=[tmp_path / "forge"])
    monkeypatch.setenv(ENV, cfg.to_json())
    main_py = Path(__file__).resolve().parents[1] / "workbench" / "app" / "main.py"
    at = AppTest.from_file(str(main_py), default_timeout=60).run()
    at.switch_page("views/models.py").run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    rows = {name: row for name, row in zip(table["name"], table.to_dict("records"))}
    assert rows["models/Stable-diffusion/dreamy.safetensors"]["folder"] == \
        "A1111/Forge: checkpoints"
    assert rows["models/LyCORIS/loha.safetensors"]["folder"] == "A1111/Forge: LoRA / LyCORIS"
    assert rows["mine.safetensors"]["folder"] == "models" and rows["mine.safetensors"]["arch"] \
        == "sd15"
    assert "pickle: convert" in rows["models/Stable-diffusion/old.ckpt"]["error"]
    assert len(rows) == 9  # every install file once, though its folders are model roots too
    # hashes arrive from the background thread; each rerun shows what is known
    expected = hashlib.sha256((base / "models" / "VAE" / "vae.safetensors").read_bytes())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        table = at.dataframe[0].value
        hashes = dict(zip(table["name"], table["hash"]))
        if hashes["models/VAE/vae.safetensors"]:
            break
        time.sleep(0.2)
        at.run()
    assert hashes["models/VAE/vae.safetensors"] == expected.hexdigest()[:10]
