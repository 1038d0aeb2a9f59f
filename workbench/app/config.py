"""Which folders the dashboard may read and write, and where its job store lives.

The dashboard runs jobs for whoever can open it, so every path typed into a form is checked
against a few configured roots: models (inputs), outputs (results, also readable as inputs),
datasets (training images) and recipes (saved forms). A path anywhere else is refused with a message
that says which folders are allowed and how to add one. `workbench app` writes the resolved config
into the environment of the Streamlit process (WORKBENCH_APP_CONFIG, JSON); the pages read it back.

`tools` are A1111/Forge/ComfyUI installs (workbench/formats/model_folders.py): their model folders
join the models roots, so the files people already have are listed and usable where they lie; with
`output_to_tool_folders` finished merges and LoRAs are also put where those tools list them
(workbench/app/__init__.py does that while the dashboard runs).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from workbench.errors import WorkbenchError
from workbench.formats.model_folders import ModelFolders, find_install

ENV = "WORKBENCH_APP_CONFIG"
ROOT_KINDS = ("models", "outputs", "datasets", "recipes")
FLAGS = {"models": "--models", "outputs": "--outputs", "datasets": "--datasets",
         "recipes": "--recipes"}


@dataclass
class AppConfig:
    """Resolved dashboard settings (absolute paths)."""

    home: Path
    roots: dict[str, list[Path]] = field(default_factory=dict)
    db: Path | None = None
    max_workers: int = 2
    spawn_workers: bool = True  # tests turn this off to inspect queued jobs
    tools: list[Path] = field(default_factory=list)  # A1111/Forge/ComfyUI install roots
    output_to_tool_folders: bool = False

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        defaults = {k: [self.home / k] for k in ROOT_KINDS}
        roots = {k: [Path(p).resolve() for p in self.roots.get(k) or defaults[k]]
                 for k in ROOT_KINDS}
        self.roots = roots
        self.db = Path(self.db).resolve() if self.db else self.home / ".workbench" / "jobs.sqlite"
        self.tools = [Path(os.path.expanduser(str(t))).resolve() for t in self.tools or []]
        if self.output_to_tool_folders and not self.tools:
            raise WorkbenchError("output_to_tool_folders: needs an install to write to; give "
                                 "`--tool ROOT` (or `tools:` in the config file)")
        for install in self.installs():  # their folders become model folders the forms accept
            for folder in install.paths():
                if folder.resolve() not in self.roots["models"]:
                    self.roots["models"].append(folder.resolve())

    def installs(self) -> list[ModelFolders]:
        """The model folders of each configured install (a WorkbenchError names a bad one)."""
        return [find_install(t) for t in self.tools]

    # ------------------------------------------------------------------------------- transport

    def to_json(self) -> str:
        data = asdict(self)
        data["home"] = str(self.home)
        data["db"] = str(self.db)
        data["roots"] = {k: [str(p) for p in v] for k, v in self.roots.items()}
        data["tools"] = [str(p) for p in self.tools]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "AppConfig":
        data = json.loads(text)
        return cls(home=Path(data["home"]), roots=data.get("roots") or {}, db=data.get("db"),
                   max_workers=int(data.get("max_workers", 2)),
                   spawn_workers=bool(data.get("spawn_workers", True)),
                   tools=data.get("tools") or [],
                   output_to_tool_folders=bool(data.get("output_to_tool_folders", False)))

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "AppConfig":
        """A small YAML file: {home, models: [..], outputs, datasets: [..], recipes, db, workers,
        tools: [..], output_to_tool_folders}; relative paths resolve against the file's folder."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise WorkbenchError(f"{path}: cannot read the dashboard config: {e}") from None
        if not isinstance(data, dict):
            raise WorkbenchError(f"{path}: expected a mapping with home, models, outputs, "
                                 "datasets, recipes, db, workers")
        allowed = {"home", "db", "workers", "tools", "output_to_tool_folders", *ROOT_KINDS}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise WorkbenchError(f"{path}: unknown field(s) {', '.join(unknown)} (expected: "
                                 f"{', '.join(sorted(allowed))})")
        base = path.parent.resolve()

        def absolute(p) -> Path:
            return (base / os.path.expanduser(str(p))).resolve()

        roots = {}
        for kind in ROOT_KINDS:
            value = data.get(kind)
            if value is not None:
                roots[kind] = [absolute(v) for v in (value if isinstance(value, list) else [value])]
        tools = data.get("tools") or []
        flag = data.get("output_to_tool_folders", False)
        if not isinstance(flag, bool):
            raise WorkbenchError(f"{path}: output_to_tool_folders: expected true or false, got "
                                 f"{flag!r}")
        cfg = dict(home=absolute(data.get("home", ".")), roots=roots,
                   db=absolute(data["db"]) if data.get("db") else None,
                   max_workers=int(data.get("workers", 2)),
                   tools=[absolute(t) for t in (tools if isinstance(tools, list) else [tools])],
                   output_to_tool_folders=flag)
        for key, value in overrides.items():
            if key == "roots":
                cfg["roots"] = {**cfg["roots"], **{k: v for k, v in value.items() if v}}
            elif value is not None:
                cfg[key] = value
        return cls(**cfg)

    # ----------------------------------------------------------------------------------- paths

    def resolve(self, text: str | Path) -> Path:
        """A path typed in a form: `~` expanded, relative paths against the home folder."""
        path = Path(os.path.expanduser(str(text).strip()))
        return Path(os.path.normpath(path if path.is_absolute() else self.home / path))

    def show(self, path: str | Path | None) -> str:
        """A path as the forms show it: relative to home when inside it."""
        if path is None or str(path) == "":
            return ""
        path = Path(path)
        try:
            return path.relative_to(self.home).as_posix()
        except ValueError:
            return str(path)

    def allowed(self, path: Path, kinds: tuple[str, ...]) -> bool:
        real = Path(os.path.realpath(path))
        for kind in kinds:
            for root in self.roots[kind]:
                if real == root or root in real.parents or Path(os.path.normpath(path)) == root \
                        or root in Path(os.path.normpath(path)).parents:
                    return True
        return False

    def check(self, text: str | Path, kinds: tuple[str, ...]) -> Path:
        """The absolute path, or a WorkbenchError naming the allowed folders and the flag to add
        another one."""
        path = self.resolve(text)
        if not self.allowed(path, kinds):
            where = "; ".join(f"{k}: {', '.join(str(r) for r in self.roots[k])}" for k in kinds)
            flags = " or ".join(FLAGS[k] for k in kinds)
            raise WorkbenchError(f"{path} is outside the dashboard's folders ({where}); start "
                                 f"`workbench app {flags} DIR` (or list it in --config) to allow "
                                 "it")
        return path


def load_config() -> AppConfig:
    """The config `workbench app` passed to this Streamlit process (default: the current folder)."""
    text = os.environ.get(ENV)
    if text:
        return AppConfig.from_json(text)
    return AppConfig(home=Path.cwd())
