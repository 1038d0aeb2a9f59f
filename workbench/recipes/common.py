"""Field types shared by every recipe kind.

Recipes are files users keep and share, so the types here do two jobs: turn YAML values into typed
values (absolute paths, LoRA references, sampler names) and, when a value is wrong, say what was
expected in words a user understands. The loader (`loader.py`) adds the file and line.

Relative paths resolve against the recipe file's folder: the loader passes that folder as the
validation context (`{"base_dir": Path}`). Without a context (a recipe built in code) paths are kept
as given.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    SerializationInfo,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from workbench.formats import lbw
from workbench.pipeline.samplers import SCHEDULERS, UNAVAILABLE
from workbench.formats.blocks import presets

# --------------------------------------------------------------------------------------------------
# choices and "did you mean"


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """'; did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
        close = [lowered[c] for c in close]
    return f"; did you mean '{close[0]}'?" if close else ""


def user_error(kind: str, message: str) -> PydanticCustomError:
    """A validation error whose message is final text: the loader shows it as it is."""
    return PydanticCustomError(kind, "{message}", {"message": message})


def choice_error(value: Any, choices: list[str] | tuple[str, ...], what: str) -> PydanticCustomError:
    """The error for a value that is not one of a fixed set of names."""
    listed = ", ".join(choices)
    hint = did_you_mean(str(value), choices)
    return user_error("unknown_choice", f"unknown {what} {value!r}{hint} (expected one of: {listed})")


# --------------------------------------------------------------------------------------------------
# the base of every recipe model


class StrictModel(BaseModel):
    """A recipe section: unknown fields are errors, and each mapping remembers its allowed fields.

    The loader turns pydantic's "extra inputs are not permitted" into "unknown field 'alpah'; did you
    mean 'alpha'?"; to do that it needs the fields of the model that rejected the key, which the
    before-validator records in the validation context, keyed by the identity of the input mapping.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _remember_fields(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and isinstance(info.context, dict):
            info.context.setdefault("fields_by_id", {})[id(data)] = cls.field_keys()
        return data

    @classmethod
    def field_keys(cls) -> list[str]:
        """Field names as written in YAML (aliases where a name is a Python keyword)."""
        return [f.alias or name for name, f in cls.model_fields.items()]


class RecipeBase(StrictModel):
    """Fields and provenance common to every recipe kind."""

    KIND: ClassVar[str] = ""
    _source_path: Path | None = PrivateAttr(default=None)
    _source_text: str | None = PrivateAttr(default=None)

    @property
    def source_path(self) -> Path | None:
        """The recipe file this recipe was read from (None when built in code)."""
        return self._source_path

    @property
    def source_text(self) -> str | None:
        """The recipe file's original text, kept verbatim for provenance."""
        return self._source_text

    @property
    def base_dir(self) -> Path | None:
        """The folder relative paths were resolved against."""
        return self._source_path.parent if self._source_path else None

    def reference_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems that span fields (e.g. a step naming an unknown input), as (location, message).

        Kinds override this; the loader maps each location to a line. Kept out of pydantic's
        validators so that each problem keeps its own location instead of one error for the model.
        """
        return []

    @model_validator(mode="after")
    def _name_from_file(self, info: ValidationInfo) -> "RecipeBase":
        """Kinds whose `name` is optional are named after their recipe file (else their kind)."""
        if "name" in type(self).model_fields and getattr(self, "name", "") is None:
            ctx = info.context if isinstance(info.context, dict) else {}
            self.name = ctx.get("stem") or self.KIND
        return self

    @model_validator(mode="after")
    def _check_references(self, info: ValidationInfo) -> "RecipeBase":
        # The loader asks to defer these (context "defer_checks") so it can place each on its line.
        if isinstance(info.context, dict) and info.context.get("defer_checks"):
            return self
        problems = self.reference_errors()
        if problems:
            text = "; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems)
            raise ValueError(text)
        return self


# --------------------------------------------------------------------------------------------------
# paths


def _base_dir(info: ValidationInfo) -> Path | None:
    ctx = info.context if isinstance(info.context, dict) else {}
    base = ctx.get("base_dir")
    return Path(base) if base is not None else None


def resolve_path(value: str | Path, base_dir: Path | None) -> Path:
    """`~` expanded, then made absolute against `base_dir` (the recipe's folder) when relative."""
    path = Path(os.path.expanduser(str(value)))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return Path(os.path.normpath(path)) if path.is_absolute() else path


def _check_path_text(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise user_error("empty_path", "expected a file or folder path (got an empty text)")
    if not isinstance(value, (str, Path)):
        raise user_error("path_type", f"expected a file or folder path as text (got {value!r})")
    return value


def _resolve(value: Path, info: ValidationInfo) -> Path:
    return resolve_path(value, _base_dir(info))


def dump_path(path: Path, info: SerializationInfo) -> str:
    """Paths are written relative to the folder the YAML will live in, when one is given."""
    ctx = info.context if isinstance(info.context, dict) else {}
    base = ctx.get("base_dir")
    if base is not None and path.is_absolute():
        try:
            return Path(os.path.relpath(path, base)).as_posix()
        except ValueError:  # another drive on Windows
            return str(path)
    return str(path)


RecipePath = Annotated[Path, BeforeValidator(_check_path_text), AfterValidator(_resolve),
                       PlainSerializer(dump_path)]
"""A file or folder path; relative paths resolve against the recipe's folder."""

# --------------------------------------------------------------------------------------------------
# names

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise user_error(
            "bad_name", "expected a name made of letters, digits, '.', '_', '-' or '+' that does "
            f"not start with a dot, since it becomes a file name (got {value!r})")
    return value


RecipeName = Annotated[str, AfterValidator(_check_name)]

# --------------------------------------------------------------------------------------------------
# LoRA references: "path:weight"


def _check_lora_blocks(value: str | None) -> str | None:
    """A LoRA Block Weight value (workbench/formats/lbw.py): a preset (INS, ALL0.5, ...; also the
    merge presets GRAD_V, ...) or 12/17/20/26/61 numbers; which counts fit is checked per model."""
    if value is None:
        return None

    text = lbw.strip_prefix(str(value))
    if lbw.looks_like_lbw(text) or any(p.upper() == text.upper() for p in presets()):
        return text
    raise user_error(
        "bad_lora_blocks", f"bad LoRA block weights {value!r}: expected a LoRA Block Weight preset "
        f"({', '.join(lbw.PRESETS)}) or 17 (SD1.5), 12 (SDXL), 26, 20 or 61 (FLUX) comma-separated "
        "numbers")


class LoraRef(StrictModel):
    """A LoRA file, the weight it is applied with and optional block weights."""

    path: RecipePath
    weight: float = 1.0
    blocks: Annotated[str | None, AfterValidator(_check_lora_blocks)] = None


def split_lora(text: str) -> tuple[str, float]:
    """Split "path:weight" into its parts; the weight is optional (1.0).

    The colon of a Windows drive letter ("C:\\loras\\x.safetensors:0.8") is not a weight separator:
    only a last part without slashes after a colon that is not a drive letter counts as the weight,
    and it must then be a number.
    """
    text = text.strip()
    head, sep, tail = text.rpartition(":")
    if not sep or not head or "/" in tail or "\\" in tail:
        return text, 1.0
    if len(head) == 1 and head.isalpha():  # "C:x.safetensors": a drive letter, no weight
        return text, 1.0
    try:
        return head, float(tail)
    except ValueError:
        raise user_error(
            "bad_lora_weight", f"bad LoRA weight {tail!r} in {text!r}: expected 'path:weight' with "
            "a number after the last colon, e.g. 'loras/style.safetensors:0.8'") from None


def split_lora_spec(text: str) -> tuple[str, float, str | None]:
    """"path:weight:blocks" -> (path, weight, blocks or None), the LoRA Block Weight extension's
    `<lora:name:weight:INS>` order; blocks need the weight before them, or an `lbw=` prefix
    ("x.safetensors:lbw=INS", weight 1). Without blocks this is `split_lora`."""
    text = text.strip()
    head, sep, tail = text.rpartition(":")
    tail = tail.strip()
    if sep and head and "/" not in tail and "\\" not in tail and lbw.looks_like_lbw(tail):
        explicit = lbw.strip_prefix(tail) != tail
        path, weight = split_lora(head)
        if path != head.strip() or explicit:
            return path, weight, lbw.strip_prefix(tail)
    path, weight = split_lora(text)
    return path, weight, None


def _parse_lora(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, str):
        path, weight, blocks = split_lora_spec(value)
        if not path:
            raise user_error("bad_lora", f"expected 'path:weight' (got {value!r})")
        return {"path": path, "weight": weight, **({"blocks": blocks} if blocks else {})}
    if isinstance(value, dict) or isinstance(value, LoraRef):
        return value
    raise user_error("bad_lora", f"expected a LoRA as 'path:weight' text (got {value!r})")


def _dump_lora(ref: LoraRef, info: SerializationInfo) -> str:
    text = f"{dump_path(ref.path, info)}:{ref.weight:g}"
    return f"{text}:lbw={ref.blocks}" if ref.blocks else text


LoraSpec = Annotated[LoraRef, BeforeValidator(_parse_lora), PlainSerializer(_dump_lora)]
"""A LoRA written as "path:weight" (weight optional, 1.0) or "path:weight:blocks" (LoRA Block
Weight: a preset such as INS or a quoted comma list); stored as a LoraRef."""

# --------------------------------------------------------------------------------------------------
# samplers (A1111 names; the generation core maps them to schedulers)

# A1111 sampler names: those the generation core maps to a diffusers scheduler, and those it
# explains it cannot run (workbench.pipeline.samplers is the one table of both).
SAMPLERS: tuple[str, ...] = (*SCHEDULERS, *UNAVAILABLE)
_SAMPLER_BY_KEY = {s.lower().replace(" ", ""): s for s in SAMPLERS}


def _check_sampler(value: str) -> str:
    """Accept A1111 sampler names, ignoring case and spaces ('euler a' -> 'Euler a')."""
    found = _SAMPLER_BY_KEY.get(value.lower().replace(" ", ""))
    if found is None:
        raise choice_error(value, SAMPLERS, "sampler")
    return found


SamplerName = Annotated[str, AfterValidator(_check_sampler)]

# --------------------------------------------------------------------------------------------------
# image sizes


def _check_multiple_of_8(value: int) -> int:
    if value % 8:
        raise user_error("size_multiple", f"expected a multiple of 8 pixels (got {value})")
    return value


PixelSize = Annotated[int, Field(ge=64), AfterValidator(_check_multiple_of_8)]
"""An image side in pixels: at least 64, a multiple of 8."""

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768): width by height, each a multiple of 8."""
    m = _SIZE_RE.match(str(text))
    if not m or int(m.group(1)) % 8 or int(m.group(2)) % 8 or "0" in (m.group(1), m.group(2)):
        raise user_error(
            "bad_size", f"expected WIDTHxHEIGHT with multiples of 8, e.g. '512x768' (got {text!r})")
    return int(m.group(1)), int(m.group(2))


def _check_size_text(value: str) -> str:
    w, h = parse_size(value)
    return f"{w}x{h}"


SizeText = Annotated[str, AfterValidator(_check_size_text)]


# --------------------------------------------------------------------------------------------------
# YAML 1.1 reads `no` / `yes` as booleans; fields whose choices include those words take them back.


def yaml_bool_words(value: Any) -> Any:
    """`mixed_precision: no` arrives as False from YAML 1.1; give the word back."""
    if value is False:
        return "no"
    if value is True:
        return "yes"
    return value
