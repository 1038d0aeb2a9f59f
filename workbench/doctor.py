"""`workbench doctor`: what this machine has for workbench, and one fix for each problem found.

Two steps, so that every rule is tested on machines we do not have (tests/test_doctor.py fakes an
RTX 2060, 3060, 4090, a machine without a GPU and a CPU-only torch on a GPU machine):
- `collect_facts()` asks the machine: Python, torch and its CUDA build, each GPU (torch, or
  nvidia-smi when torch cannot see it: workbench/torch_build.py), the driver, the CPU's bf16, RAM
  (psutil), free disk where outputs and caches go, bitsandbytes, the T5 tokenizer and CLIP scorer
  weights, and the model folders of the dashboard's configuration (workbench/app/config.py).
- `diagnose(facts)` is pure: findings (level, what, fix). Precision comes from the same rule that
  generation and training use (`workbench.hardware.compute_dtype`).

Heavy or optional packages (torch, bitsandbytes, psutil, open_clip, huggingface_hub) are imported
inside the probes: the doctor must still report when one of them is missing or broken.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workbench import hardware, torch_build
from workbench.app.config import ENV as APP_CONFIG_ENV, AppConfig
from workbench.formats.pipeline_config import cache_root
from workbench.system import free_bytes

GB = 10**9
LEVELS = ("error", "warn", "info")
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".gguf", ".pt", ".pth", ".sft")
MAX_SCAN = 20000                # files looked at per model folder (a Forge tree has a few thousand)
LOW_VRAM = 6 * GB               # below this even SD1.5 training needs fp8 storage and checkpointing
LOW_RAM = 16 * GB               # FLUX/SD3.5 wait in RAM while offloaded or streamed
LOW_DISK = 20 * GB              # a merged FLUX checkpoint is ~23 GB, SDXL ~6.9 GB
LOW_CACHE_DISK = 5 * GB         # latent and text-encoder caches of one training run
CLIP_SCORER = ("ViT-L-14", "openai")  # the grid recipes' default scorer (workbench/recipes/grid.py)
SYSMEM_FIX = ("NVIDIA Control Panel > Manage 3D settings > CUDA - Sysmem Fallback Policy > "
              "Prefer No Sysmem Fallback (drivers 536.40 and later), then restart workbench")


@dataclass
class Gpu:
    """One GPU: as torch sees it, or as nvidia-smi lists it when torch cannot use it."""

    name: str
    vram_bytes: int | None = None
    capability: tuple[int, int] | None = None
    seen_by_torch: bool = False


@dataclass
class Folder:
    """A folder workbench reads or writes, with the free space on its disk."""

    role: str                   # models | outputs | cache
    path: str
    exists: bool = False
    free_bytes: int | None = None
    model_files: int | None = None   # models folders: model files found below it


@dataclass
class Facts:
    """Everything the diagnosis looks at (JSON-able: `workbench doctor --json` prints it)."""

    os: str = ""                        # platform.system(): Windows, Darwin, Linux
    os_release: str = ""
    python: str = ""                    # version
    python_cmd: str = "python"          # the interpreter as the user types it in a fix
    torch: str | None = None            # version; None: not importable
    torch_problem: str | None = None    # why torch would not import
    torch_cuda: str | None = None       # torch.version.cuda (None: a CPU-only build)
    torch_rocm: str | None = None
    torch_archs: list[str] = field(default_factory=list)   # sm_XX the build has kernels for
    cuda_available: bool = False
    driver: str | None = None           # NVIDIA driver version (nvidia-smi)
    driver_cuda: tuple[int, int] | None = None  # newest CUDA the driver runs
    gpus: list[Gpu] = field(default_factory=list)
    cpu: str = ""
    cpu_bf16: bool = False
    mps: bool = False                   # an Apple GPU that torch sees
    bitsandbytes: str | None = None     # version; None: not installed
    nf4_usable: bool = False            # bitsandbytes quantizes to NF4 on the device workbench uses
    bitsandbytes_problem: str | None = None
    ram_total: int | None = None        # bytes; None: psutil not installed
    ram_available: int | None = None
    folders: list[Folder] = field(default_factory=list)
    t5_tokenizer: str | None = None     # the folder found, or None
    clip_weights: str | None = None     # the scorer weights file found, or None
    hf_cache: str = ""                  # where the Hugging Face cache is

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Facts":
        data = dict(data)
        data["gpus"] = [Gpu(**{**g, "capability": _pair(g.get("capability"))}) for g in data.get("gpus", [])]
        data["folders"] = [Folder(**f) for f in data.get("folders", [])]
        data["driver_cuda"] = _pair(data.get("driver_cuda"))
        return cls(**data)

    def device(self) -> hardware.DeviceFacts:
        """The device workbench computes on once torch can use the first GPU (the CPU otherwise)."""
        if self.gpus and (self.gpus[0].seen_by_torch or self.torch_rocm is None):
            gpu = self.gpus[0]
            return hardware.DeviceFacts("cuda", gpu.name, gpu.capability, rocm=self.torch_rocm is not None)
        return hardware.DeviceFacts("cpu", self.cpu or "cpu", cpu_bf16=self.cpu_bf16)

    def driver_facts(self) -> torch_build.DriverFacts:
        smi = tuple(torch_build.SmiGpu(i, g.name, None, g.capability) for i, g in enumerate(self.gpus))
        return torch_build.DriverFacts(self.driver, self.driver_cuda, smi)


def _pair(value) -> tuple[int, int] | None:
    return (int(value[0]), int(value[1])) if value else None


@dataclass(frozen=True)
class Finding:
    """One thing the doctor says: level (error, warn, info), what it found, the one fix."""

    level: str
    what: str
    fix: str | None = None


# ------------------------------------------------------------------------------------- collecting

def collect_facts(config: AppConfig | None = None) -> Facts:
    """Ask this machine. `config` names the model and output folders (default: the dashboard's
    configuration in the environment, else the current folder's models/ and outputs/)."""
    facts = Facts(os=platform.system(), os_release=platform.release(),
                  python=platform.python_version(),
                  python_cmd=torch_build.display_python(sys.executable, Path.cwd()),
                  cpu=platform.processor() or platform.machine())
    _torch_facts(facts)
    driver = torch_build.probe_driver()
    facts.driver, facts.driver_cuda = driver.driver, driver.cuda
    if not facts.gpus:  # torch sees none: what the driver lists
        facts.gpus = [Gpu(g.name, g.vram_mib * 2**20 if g.vram_mib else None, g.capability)
                      for g in driver.gpus]
    _bitsandbytes_facts(facts)
    _ram_facts(facts)
    facts.folders = _folders(config or _app_config())
    facts.t5_tokenizer = _t5_tokenizer()
    facts.clip_weights, facts.hf_cache = _clip_weights()
    return facts


def _torch_facts(facts: Facts) -> None:
    try:
        import torch  # heavy, and the thing being diagnosed: may be missing or broken
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        facts.torch_problem = f"{type(e).__name__}: {e}"
        return
    facts.torch, facts.torch_cuda = torch.__version__, torch.version.cuda
    facts.torch_rocm = getattr(torch.version, "hip", None)
    facts.cpu_bf16 = hardware.cpu_has_native_bf16()
    facts.cpu = f"{facts.cpu} ({torch.backends.cpu.get_cpu_capability()})"
    facts.mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    facts.cuda_available = torch.cuda.is_available()
    if facts.cuda_available:
        facts.torch_archs = list(torch.cuda.get_arch_list())
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            facts.gpus.append(Gpu(props.name, int(props.total_memory),
                                  tuple(torch.cuda.get_device_capability(i)), seen_by_torch=True))


def _bitsandbytes_facts(facts: Facts) -> None:
    from importlib import metadata

    try:
        facts.bitsandbytes = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return
    if facts.torch is None:
        return
    try:
        from workbench.pipeline.precision import nf4_available  # torch-heavy: only once torch imports

        device = "cuda" if facts.cuda_available else "cpu"
        facts.nf4_usable = nf4_available(device)
        if not facts.nf4_usable:
            facts.bitsandbytes_problem = f"it cannot quantize to NF4 on the {device}"
    except Exception as e:  # noqa: BLE001 - a broken install is what we report
        facts.bitsandbytes_problem = f"{type(e).__name__}: {e}"


def _ram_facts(facts: Facts) -> None:
    try:
        import psutil  # optional: without it the RAM check is skipped
    except ImportError:
        return
    mem = psutil.virtual_memory()
    facts.ram_total, facts.ram_available = int(mem.total), int(mem.available)


def _app_config() -> AppConfig:
    text = os.environ.get(APP_CONFIG_ENV)
    return AppConfig.from_json(text) if text else AppConfig(home=Path.cwd())


def _count_models(root: Path) -> int:
    count = 0
    for i, p in enumerate(root.rglob("*")):
        if i >= MAX_SCAN:
            break
        count += p.suffix.lower() in MODEL_SUFFIXES and p.is_file()
    return count


def _folders(config: AppConfig) -> list[Folder]:
    out = []
    for root in config.roots["models"]:
        out.append(Folder("models", str(root), root.is_dir(), free_bytes(root),
                          _count_models(root) if root.is_dir() else None))
    for role, path in (("outputs", config.roots["outputs"][0]), ("cache", cache_root())):
        out.append(Folder(role, str(path), path.is_dir(), free_bytes(path)))
    return out


def _t5_tokenizer() -> str | None:
    try:  # the loader's own search ($WORKBENCH_T5_TOKENIZER, then the HF cache)
        from workbench.formats.pipeline_configs_dit import find_real_t5
    except Exception:  # noqa: BLE001 - its imports (torch, diffusers) may be what is broken
        return None
    found = find_real_t5()
    return str(found) if found else None


def _clip_weights() -> tuple[str | None, str]:
    try:  # the grid scorer's own lookup in the HF cache (never downloads)
        from huggingface_hub import constants

        from workbench.grid.scores import _hf_cached_weights
    except Exception:  # noqa: BLE001 - open_clip/torch may be what is broken
        return None, ""
    try:
        path, _ = _hf_cached_weights(*CLIP_SCORER)
        return str(path), str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - "not in the cache" comes as WorkbenchError or open_clip errors
        return None, str(constants.HF_HUB_CACHE)


# ------------------------------------------------------------------------------------- diagnosing

def diagnose(facts: Facts) -> list[Finding]:
    """Every finding, errors first; pure (tests pass faked facts)."""
    found: list[Finding] = []
    for check in (_python, _torch, _gpu, _precision, _vram, _sysmem_fallback, _nf4, _ram, _disk,
                  _t5, _clip, _models):
        found += check(facts)
    return sorted(found, key=lambda f: LEVELS.index(f.level))


def _python(f: Facts) -> list[Finding]:
    major, minor = (int(x) for x in f.python.split(".")[:2])
    if (major, minor) < (3, 10):
        return [Finding("error", f"Python {f.python} is too old (workbench needs 3.10 or newer)",
                        "install Python 3.11 from python.org, then run: python run.py demo")]
    return []


def _pip(f: Facts, args: str) -> str:
    return f"{f.python_cmd} -m pip install {args}"


def _torch(f: Facts) -> list[Finding]:
    if f.torch is None:
        return [Finding("error", f"torch does not import ({f.torch_problem or 'not installed'})",
                        "run: " + _pip(f, "--force-reinstall " + " ".join(torch_build.TORCH_PINS)))]
    return []


def _gpu(f: Facts) -> list[Finding]:
    if f.torch is None:
        return []
    driver = f.driver_facts()
    if f.gpus and not f.cuda_available and f.torch_rocm is None and f.driver:
        if f.torch_cuda is None:
            what, fix = torch_build.cpu_torch_problem(driver, f.torch, f.python_cmd)
        else:
            what, fix = torch_build.driver_problem(driver, f.torch, f.torch_cuda, f.python_cmd)
        return [Finding("error", what, fix)]
    if not f.gpus:
        extra = (" (the Apple GPU is not used yet)" if f.mps else "")
        return [Finding("info", f"no NVIDIA GPU found: workbench computes on the CPU{extra}; real "
                        "SD1.5/SDXL images take minutes each there",
                        "for quick previews use an LCM-LoRA with sampler: LCM, 2-4 steps, cfg: 1")]
    out = []
    for gpu in f.gpus:
        if gpu.seen_by_torch and gpu.capability and f.torch_archs and f.torch_rocm is None \
                and not _has_kernels(gpu.capability, f.torch_archs):
            cc = f"{gpu.capability[0]}.{gpu.capability[1]}"
            out.append(Finding(
                "error", f"torch {f.torch} has no kernels for {gpu.name} (compute capability {cc}; "
                f"it has {', '.join(f.torch_archs)})",
                "install a torch build that lists sm_" + cc.replace(".", "") + ": "
                + torch_build.cuda_build_fix(driver, f.python_cmd)))
    return out


def _has_kernels(cap: tuple[int, int], archs: list[str]) -> bool:
    """CUDA runs sm_XY code on the same major version with a minor >= Y, and PTX (compute_XY) on
    any later GPU after a JIT compile."""
    for arch in archs:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        major, minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and major == cap[0] and minor <= cap[1]:
            return True
        if kind == "compute" and (major, minor) <= cap:
            return True
    return False


def _precision(f: Facts) -> list[Finding]:
    dev = f.device()
    if dev.kind == "cuda" and dev.capability and not dev.bf16 and not dev.rocm:
        cc = f"{dev.capability[0]}.{dev.capability[1]}"
        return [Finding("info", f"{dev.name} computes bf16 only by emulation (compute capability {cc}): "
                        "workbench generates and trains in fp16 there (fp16 training with loss scaling)",
                        "keep mixed_precision: auto and memory.weights: auto (or fp16); bf16 there "
                        "runs much slower")]
    return []


def _vram(f: Facts) -> list[Finding]:
    gpu = f.gpus[0] if f.gpus else None
    if gpu is None or gpu.vram_bytes is None or gpu.vram_bytes >= LOW_VRAM:
        return []
    return [Finding("warn", f"{gpu.name} has {gpu.vram_bytes / GB:.1f} GB of VRAM: SDXL and FLUX "
                    "stream most of their weights from RAM every step",
                    "use memory: {weights: fp8} in generate recipes and base_precision: fp8 with "
                    "gradient_checkpointing: true in train recipes")]


def _sysmem_fallback(f: Facts) -> list[Finding]:
    if f.os != "Windows" or not f.gpus or not f.driver:
        return []
    return [Finding("warn", "the NVIDIA driver's CUDA Sysmem Fallback may be on (the default; it "
                    "cannot be read from here): when VRAM runs out, memory silently spills into "
                    "shared system RAM and low-VRAM runs get 5-10x slower instead of workbench's "
                    "planned streaming", SYSMEM_FIX)]


def _nf4(f: Facts) -> list[Finding]:
    if f.torch is None:
        return []
    if f.bitsandbytes is None:
        return [Finding("info", "bitsandbytes is not installed: NF4 (weights: nf4, base_precision: "
                        "nf4) is unavailable; fp8 storage works without it",
                        "run: " + _pip(f, '-e ".[nf4]"'))]
    if f.bitsandbytes_problem:
        return [Finding("warn", f"bitsandbytes {f.bitsandbytes} is installed but not usable: "
                        f"{f.bitsandbytes_problem}",
                        "run: " + _pip(f, "--force-reinstall --upgrade bitsandbytes"))]
    return []


def _ram(f: Facts) -> list[Finding]:
    if f.ram_total is None:
        return [Finding("info", "RAM not checked: psutil is not installed",
                        "run: " + _pip(f, "psutil"))]
    if f.ram_total < LOW_RAM:
        return [Finding("warn", f"{f.ram_total / GB:.1f} GB of RAM: SD3.5 and FLUX wait in RAM while "
                        "offloaded or streamed and may not fit",
                        "use memory: {weights: fp8} (or nf4) for those models and close other programs")]
    return []


def _disk(f: Facts) -> list[Finding]:
    out = []
    for folder in f.folders:
        if folder.free_bytes is None:
            continue
        if folder.role == "outputs" and folder.free_bytes < LOW_DISK:
            out.append(Finding("warn", f"{folder.free_bytes / GB:.1f} GB free at {folder.path}: a "
                               "merged SDXL checkpoint is ~7 GB, a FLUX one ~23 GB",
                               "free space there, or write outputs elsewhere (output: in recipes, "
                               "workbench app --outputs DIR)"))
        if folder.role == "cache" and folder.free_bytes < LOW_CACHE_DISK:
            out.append(Finding("warn", f"{folder.free_bytes / GB:.1f} GB free for the cache at "
                               f"{folder.path} (hashes, latent and text-encoder caches)",
                               "set WORKBENCH_CACHE to a folder on a disk with space: "
                               + _set_env(f, "WORKBENCH_CACHE", _example(f, "cache"))))
    return out


def _example(f: Facts, what: str) -> str:
    windows = {"cache": r"D:\workbench-cache", "t5": r"D:\models\t5-tokenizer"}
    posix = {"cache": "/data/workbench-cache", "t5": "~/models/t5-tokenizer"}
    return (windows if f.os == "Windows" else posix)[what]


def _set_env(f: Facts, name: str, value: str) -> str:
    """How to set an environment variable for good, in the user's shell."""
    if f.os == "Windows":
        return f'setx {name} "{value}" (then open a new terminal)'
    profile = "~/.zshrc" if f.os == "Darwin" else "~/.bashrc"
    return f"add  export {name}={value}  to {profile}"


def _t5(f: Facts) -> list[Finding]:
    if f.t5_tokenizer:
        return []
    return [Finding("info", "no T5-XXL tokenizer found ($WORKBENCH_T5_TOKENIZER or the Hugging Face "
                    "cache): SD3.5 and FLUX.1 cannot load without it (SD1.5/SDXL do not need it)",
                    "put tokenizer.json or spiece.model (e.g. the tokenizer_2 folder of "
                    "black-forest-labs/FLUX.1-dev) in a folder and "
                    + _set_env(f, "WORKBENCH_T5_TOKENIZER", _example(f, "t5")))]


def _clip(f: Facts) -> list[Finding]:
    if f.clip_weights:
        return []
    name, tag = CLIP_SCORER
    where = f" ({f.hf_cache})" if f.hf_cache else ""
    return [Finding("info", f"no CLIP scorer weights found ({name}/{tag} in the Hugging Face "
                    f"cache{where}): grids cannot compute CLIP, aesthetic or style scores",
                    "give scores.clip.weights: in grid recipes a local open_clip weights file "
                    "(.safetensors) or an open_clip folder")]


def _models(f: Facts) -> list[Finding]:
    out = []
    for folder in f.folders:
        if folder.role != "models":
            continue
        if not folder.exists or not folder.model_files:
            state = "does not exist" if not folder.exists else "has no model files"
            out.append(Finding("info", f"the models folder {folder.path} {state}",
                               "point the dashboard at your model folder, e.g. workbench app "
                               "--models " + _models_example(f)))
    return out


def _models_example(f: Facts) -> str:
    return r"D:\stable-diffusion-webui-forge\models" if f.os == "Windows" \
        else "~/stable-diffusion-webui-forge/models"


# ------------------------------------------------------------------------------------- reporting

def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / GB:.1f} GB"


def _vram_text(n: int | None) -> str:
    """VRAM in GB (10^9, as everywhere in workbench) and in GiB, the number on the box."""
    return "? VRAM" if n is None else f"{n / GB:.1f} GB ({n / 2**30:.0f} GiB) VRAM"


def _precision_line(f: Facts) -> str:
    dev = f.device()
    if dev.kind != "cuda":
        return f"compute {hardware.why(dev)}"
    fp8 = "fp8 storage: yes; fp8 matmul: " + ("yes" if dev.fp8_matmul else "no (needs 8.9)")
    when = "" if f.cuda_available else "once torch can use the GPU: "
    return (f"{when}compute {hardware.why(dev)}; bf16 native: {'yes' if dev.bf16 else 'no'}; "
            f"fp16: yes; {fp8}")


def facts_lines(f: Facts) -> list[tuple[str, str]]:
    """(label, value) rows describing the machine."""
    rows = [("system", f"{f.os} {f.os_release}, Python {f.python} ({f.python_cmd})")]
    if f.torch is None:
        rows.append(("torch", f"not importable: {f.torch_problem}"))
    else:
        build = (f"CUDA {f.torch_cuda}" if f.torch_cuda else f"ROCm {f.torch_rocm}" if f.torch_rocm
                 else "CPU-only build")
        rows.append(("torch", f"{f.torch} ({build}; sees a GPU: {'yes' if f.cuda_available else 'no'})"))
    if f.driver:
        cuda = f"{f.driver_cuda[0]}.{f.driver_cuda[1]}" if f.driver_cuda else "?"
        rows.append(("driver", f"NVIDIA {f.driver} (runs CUDA up to {cuda})"))
    for i, gpu in enumerate(f.gpus):
        cc = f"compute capability {gpu.capability[0]}.{gpu.capability[1]}" if gpu.capability else "?"
        seen = "" if gpu.seen_by_torch else " (not used by this torch)"
        rows.append((f"GPU {i}", f"{gpu.name}, {_vram_text(gpu.vram_bytes)}, {cc}{seen}"))
    rows.append(("precision", _precision_line(f)))
    rows.append(("CPU", f"{f.cpu or '?'}; bf16 in hardware: {'yes' if f.cpu_bf16 else 'no'}"))
    nf4 = ("not installed" if f.bitsandbytes is None else
           f"{f.bitsandbytes} (NF4 {'usable' if f.nf4_usable else 'not usable'})")
    rows.append(("bitsandbytes", nf4))
    rows.append(("RAM", "not checked (no psutil)" if f.ram_total is None
                 else f"{_gb(f.ram_total)}, {_gb(f.ram_available)} available"))
    for folder in f.folders:
        state = "" if folder.exists else " (not there yet)"
        count = f", {folder.model_files} model files" if folder.model_files is not None else ""
        rows.append((folder.role, f"{folder.path}{state}: {_gb(folder.free_bytes)} free{count}"))
    rows.append(("T5 tokenizer", f.t5_tokenizer or "not found"))
    rows.append(("CLIP scorer", f.clip_weights or "not found"))
    return rows


def report_text(f: Facts, findings: list[Finding]) -> str:
    """The readable report: the machine, then each finding with its fix."""
    lines = ["workbench doctor", ""]
    width = max(len(label) for label, _ in facts_lines(f))
    lines += [f"  {label.ljust(width)}  {value}" for label, value in facts_lines(f)]
    lines.append("")
    if not findings:
        lines.append("No problems found.")
    for x in findings:
        lines.append(f"{x.level.upper():5s}  {x.what}")
        if x.fix:
            lines.append(f"       fix: {x.fix}")
    return "\n".join(lines)


def report_json(f: Facts, findings: list[Finding]) -> str:
    return json.dumps({"facts": f.to_json(), "findings": [asdict(x) for x in findings]}, indent=2)


def main(as_json: bool = False, config: AppConfig | None = None) -> int:
    """Print the report; exit status 1 when there is an error to fix, else 0."""
    facts = collect_facts(config)
    findings = diagnose(facts)
    print(report_json(facts, findings) if as_json else report_text(facts, findings))
    return 1 if any(x.level == "error" for x in findings) else 0
