"""YAML text -> typed recipe, with every problem reported as `FILE:LINE: field: what was expected`.

The YAML is composed into nodes first (they carry line numbers), then constructed into plain data
and validated by the kind's pydantic model. Each pydantic error location is walked through the node
tree to find its line; union tags in a location (which are not YAML keys) are skipped. All problems
are collected into one `RecipeError` so a user fixes a recipe in one pass, never from a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from workbench.errors import RecipeError
from workbench.recipes.common import RecipeBase, did_you_mean
from workbench.recipes.generate import GenerateRecipe
from workbench.recipes.grid import AXIS_NAMES, GridRecipe
from workbench.recipes.extract import ExtractLoraRecipe
from workbench.recipes.merge import MergeRecipe
from workbench.recipes.merge_search import MergeSearchRecipe
from workbench.recipes.pick import PickRecipe
from workbench.recipes.train import TrainRecipe

RECIPE_KINDS: dict[str, type[RecipeBase]] = {
    "merge": MergeRecipe,
    "train": TrainRecipe,
    "grid": GridRecipe,
    "generate": GenerateRecipe,
    "extract_lora": ExtractLoraRecipe,
    "pick": PickRecipe,
    "merge_search": MergeSearchRecipe,
}
Recipe = Union[MergeRecipe, TrainRecipe, GridRecipe, GenerateRecipe, ExtractLoraRecipe, PickRecipe,
              MergeSearchRecipe]
Loc = tuple[Union[str, int], ...]


@dataclass(frozen=True)
class RecipeProblem:
    """One thing wrong with a recipe, with where it is."""

    file: str
    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: "
        return f"{where}{self.field}: {self.message}" if self.field else f"{where}{self.message}"


def recipe_error(file: str, problems: list[RecipeProblem]) -> RecipeError:
    """One RecipeError listing every problem (also kept as `.problems` for the dashboard)."""
    problems = sorted(problems, key=lambda p: (p.line, p.column))
    n = len(problems)
    head = f"invalid recipe {file} ({n} problem{'s' if n != 1 else ''}):"
    err = RecipeError("\n".join([head] + [str(p) for p in problems]))
    err.problems = problems  # type: ignore[attr-defined]
    return err


# --------------------------------------------------------------------------------------------------
# entry points


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; relative paths in it resolve against its folder."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder; expected a recipe .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not a text file in UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    return parse_recipe(text, path)


def parse_recipe(text: str, path: str | Path | None = None) -> Recipe:
    """Validate recipe text. `path` names the file in messages and anchors relative paths
    (without it, relative paths resolve against the current folder)."""
    file = str(path) if path is not None else "<recipe>"
    source = Path(path).resolve() if path is not None else None
    base_dir = source.parent if source is not None else Path.cwd()
    node, data = _read_yaml(text, file)

    problems = _duplicate_keys(node, file)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else _got(data)
        raise recipe_error(file, problems + [RecipeProblem(
            file, 1, 1, "", f"expected a mapping of recipe fields starting with `kind:` "
            f"(one of: {', '.join(RECIPE_KINDS)}) (got {got})")])
    cls = _recipe_class(node, data, file, problems)

    stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", source.stem).strip("-.") if source else ""
    context: dict[str, Any] = {"base_dir": base_dir, "stem": stem or None, "defer_checks": True}
    try:
        recipe = cls.model_validate(data, context=context)
    except ValidationError as e:
        problems += [_pydantic_problem(err, node, data, context, file) for err in e.errors()]
        raise recipe_error(file, problems) from None
    problems += _escaped_paths(recipe, node, text, file)
    for loc, message in recipe.reference_errors():
        line, col, field = _locate(node, loc, keep_unfound=True)
        problems.append(RecipeProblem(file, line, col, field, message))
    if problems:
        raise recipe_error(file, problems)
    recipe._source_path = source
    recipe._source_text = text
    return recipe  # type: ignore[return-value]


def recipe_to_yaml(recipe: RecipeBase, base_dir: str | Path | None = None) -> str:
    """YAML text for a recipe; paths are written relative to `base_dir` (default: the folder the
    recipe was read from), so the text loads back to the same recipe from that folder."""
    base = Path(base_dir) if base_dir is not None else recipe.base_dir
    data = recipe.model_dump(mode="json", by_alias=True, exclude_unset=True,
                             context={"base_dir": base})
    data = {"kind": recipe.KIND, **{k: v for k, v in data.items() if k != "kind"}}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


# --------------------------------------------------------------------------------------------------
# YAML


def _read_yaml(text: str, file: str) -> tuple[yaml.Node | None, Any]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
        return node, data
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        escape = _escape_error(e, text)
        if escape:
            raise recipe_error(file, [RecipeProblem(file, line, (mark.column + 1) if mark else 1, "",
                                                    escape)]) from None
        what = e.problem or "cannot read this"
        if "'\\t'" in what:
            what += " (YAML indents with spaces, not tabs)"
        context = f" ({e.context} at line {e.context_mark.line + 1})" if (
            e.context and e.context_mark and e.context_mark is not mark) else ""
        raise recipe_error(file, [RecipeProblem(file, line, (mark.column + 1) if mark else 1, "",
                                                f"YAML syntax error: {what}{context}")]) from None
    except yaml.YAMLError as e:  # reader errors (bad characters) carry a position, not a mark
        pos = getattr(e, "position", 0) or 0
        line = text[:pos].count("\n") + 1
        raise recipe_error(file, [RecipeProblem(file, line, 1, "", f"YAML error: {e}")]) from None
    finally:
        loader.dispose()


# Windows paths in double quotes: YAML reads a backslash there as the start of an escape sequence, so
# "C:\Users\me" is a syntax error (\U wants 8 hex digits) and "D:\new\art.safetensors" silently
# becomes "D:" + newline + "ew" + bell + "rt.safetensors". Both get a message with the fix.
_ESCAPE_PROBLEMS = ("unknown escape character", "expected escape sequence")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_NAMES = {"\n": "a newline (\\n)", "\t": "a tab (\\t)", "\r": "a carriage return (\\r)",
                  "\a": "a bell character (\\a)", "\b": "a backspace (\\b)", "\f": "a form feed (\\f)",
                  "\v": "a vertical tab (\\v)", "\0": "a null character (\\0)", "\x1b": "an escape (\\e)"}


def _path_fix(inner: str) -> str:
    """The two ways to write a Windows path so that YAML keeps its backslashes."""
    single = inner.replace("'", "''")
    forward = inner.replace("\\", "/")
    return f"write it in single quotes ('{single}') or with forward slashes (\"{forward}\")"


def _double_quoted(text: str, index: int) -> str | None:
    """The inside of the double-quoted scalar that starts at `index` in `text` (up to the next
    double quote: a path holds none), or None when there is no such scalar."""
    if index >= len(text) or text[index] != '"':
        return None
    end = text.find('"', index + 1)
    return text[index + 1:end] if end > index else None


def _escape_error(e: yaml.MarkedYAMLError, text: str) -> str | None:
    """A message for a backslash escape error inside double quotes (a Windows path, most often)."""
    problem = e.problem or ""
    in_double_quotes = (e.context or "").endswith("double-quoted scalar")
    if not in_double_quotes or not any(p in problem for p in _ESCAPE_PROBLEMS):
        return None
    inner = _double_quoted(text, e.context_mark.index) if e.context_mark else None
    advice = _path_fix(inner) if inner else "write it in single quotes or with forward slashes"
    return (f"YAML syntax error: in double quotes a backslash starts an escape sequence ({problem}); "
            f"for a Windows path, {advice}")


def _path_values(value: Any, loc: Loc = ()):
    """(location, path) of every path in a validated recipe (model fields, mappings and lists)."""
    if isinstance(value, PurePath):
        yield loc, value
    elif isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            yield from _path_values(getattr(value, name, None), loc + (info.alias or name,))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _path_values(item, loc + (key,))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _path_values(item, loc + (i,))


def _escaped_paths(recipe: RecipeBase, root: yaml.Node | None, text: str,
                   file: str) -> list[RecipeProblem]:
    """Paths holding control characters: escapes that double quotes made of a Windows path."""
    problems = []
    for loc, path in _path_values(recipe):
        found = _CONTROL.search(str(path))
        if not found:
            continue
        node, *_ = _walk(root, None, loc, keep_unfound=False)
        char = found.group()
        name = _CONTROL_NAMES.get(char, f"a control character ({char!r})")
        inner = _double_quoted(text, node.start_mark.index) if isinstance(node, yaml.ScalarNode) else None
        if inner is not None:
            message = (f"this path contains {name}: in double quotes YAML reads a backslash as an "
                       f"escape sequence, so \"{inner}\" became another path; {_path_fix(inner)}")
        else:
            message = f"this path contains {name}; write the path without it"
        line, col, field = _locate(root, loc)
        problems.append(RecipeProblem(file, line, col, field, message))
    return problems


def _duplicate_keys(node: yaml.Node | None, file: str, path: str = "") -> list[RecipeProblem]:
    """YAML keeps the last of two equal keys silently; a recipe with both is a mistake."""
    problems: list[RecipeProblem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                name = key.value
                field = f"{path}.{name}" if path else name
                if name in seen:
                    problems.append(RecipeProblem(
                        file, key.start_mark.line + 1, key.start_mark.column + 1, field,
                        f"field given twice (first at line {seen[name]}); keep one"))
                seen.setdefault(name, key.start_mark.line + 1)
                problems += _duplicate_keys(value, file, field)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, file, f"{path}[{i}]")
    return problems


def _recipe_class(node: yaml.Node, data: dict, file: str,
                  problems: list[RecipeProblem]) -> type[RecipeBase]:
    kinds = ", ".join(RECIPE_KINDS)
    kind = data.get("kind")
    if "kind" not in data:
        raise recipe_error(file, problems + [RecipeProblem(
            file, 1, 1, "kind", f"missing; every recipe starts with `kind:` (one of: {kinds})")])
    if not isinstance(kind, str) or kind not in RECIPE_KINDS:
        line, col, _ = _locate(node, ("kind",))
        if isinstance(kind, str):
            text = f"unknown kind {kind!r}{did_you_mean(kind, list(RECIPE_KINDS))} (expected one of: {kinds})"
        else:
            text = f"expected one of: {kinds} (got {_got(kind)})"
        raise recipe_error(file, problems + [RecipeProblem(file, line, col, "kind", text)])
    return RECIPE_KINDS[kind]


# --------------------------------------------------------------------------------------------------
# locations and messages


def _walk(root: yaml.Node | None, data: Any, loc: Loc, keep_unfound: bool):
    """Follow `loc` through the nodes: (node, its key node, data, parent data, field path parts)."""
    node, key_node, parent, parts, complete = root, None, None, [], True
    for key in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(key, str):
            entry = next(((k, v) for k, v in node.value
                          if isinstance(k, yaml.ScalarNode) and k.value == key), None)
            if entry is not None:
                parent, (key_node, node) = data, entry
                data = data.get(key) if isinstance(data, dict) else None
                parts.append(key)
                continue
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            if 0 <= key < len(node.value):
                parent, node, key_node = data, node.value[key], None
                data = data[key] if isinstance(data, list) and key < len(data) else None
                parts.append(key)
                continue
        complete = False
        if keep_unfound:  # a field not written in the YAML; otherwise a union tag, skipped
            parts.append(key)
    return node, key_node, data, parent, parts, complete


def _field_text(parts: list) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _mark(node: yaml.Node | None) -> tuple[int, int]:
    if node is None:
        return 1, 1
    return node.start_mark.line + 1, node.start_mark.column + 1


def _locate(root: yaml.Node | None, loc: Loc, keep_unfound: bool = False) -> tuple[int, int, str]:
    node, key_node, _, _, parts, complete = _walk(root, None, loc, keep_unfound)
    # a field that is not written is reported on the line of the mapping that should hold it
    line, col = _mark(node if complete or key_node is None else key_node)
    return line, col, _field_text(parts)


def _got(value: Any) -> str:
    if value is None:
        return "nothing (the value is empty)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_EXPECT = {
    "int_type": "a whole number", "int_parsing": "a whole number",
    "int_from_float": "a whole number", "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "text",
    "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping of fields",
    "model_attributes_type": "a mapping of fields",
}
_BOUNDS = {"greater_than": "greater than {gt}", "greater_than_equal": "at least {ge}",
           "less_than": "less than {lt}", "less_than_equal": "at most {le}"}


def _pydantic_problem(err: dict, root: yaml.Node, data: dict, context: dict,
                      file: str) -> RecipeProblem:
    typ, loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx") or {}
    node, key_node, _, parent, parts, _ = _walk(root, data, loc, keep_unfound=False)
    if typ == "missing" and (not parts or parts[-1] != loc[-1]):
        parts.append(loc[-1])
        node = key_node or node  # the line of `output:` for a missing `output.path`
    got = _got(err.get("input"))

    if typ == "missing":
        message = "required field is missing"
    elif typ == "extra_forbidden":
        name = str(loc[-1])
        allowed = context.get("fields_by_id", {}).get(id(parent), [])
        hint = did_you_mean(name, allowed)
        message = f"unknown field '{name}'{hint}"
        if not hint and allowed:
            message += f" (expected one of: {', '.join(allowed)})"
    elif typ in ("union_tag_invalid", "union_tag_not_found"):
        disc = str(ctx.get("discriminator", "axis")).strip("'")
        tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", ""))) or list(AXIS_NAMES)
        if isinstance(node, yaml.MappingNode):
            sub = next((v for k, v in node.value if getattr(k, "value", None) == disc), None)
            node = sub or node
        parts.append(disc)
        if typ == "union_tag_not_found":
            message = f"required field is missing (expected one of: {', '.join(tags)})"
        else:
            tag = ctx.get("tag")
            message = (f"unknown {disc} {tag!r}{did_you_mean(str(tag), tags)} (expected one of: "
                       f"{', '.join(tags)})")
    elif typ == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        value = err.get("input")
        hint = did_you_mean(str(value), choices) if isinstance(value, str) else ""
        message = f"expected one of: {', '.join(choices) or ctx.get('expected')} (got {got}){hint}"
    elif typ in _EXPECT:
        message = f"expected {_EXPECT[typ]} (got {got})"
    elif typ in _BOUNDS:
        bounds = {k: f"{v:g}" if isinstance(v, (int, float)) else v for k, v in ctx.items()}
        message = f"expected a number {_BOUNDS[typ].format(**bounds)} (got {got})"
    elif typ in ("too_short", "too_long"):
        if typ == "too_short":
            n = ctx.get("min_length", 1)
            message = f"expected at least {n} item{'s' if n != 1 else ''} (got {ctx.get('actual_length', 0)})"
        else:
            n = ctx.get("max_length")
            message = f"expected at most {n} items (got {ctx.get('actual_length')})"
    elif typ == "value_error":
        message = str(ctx.get("error", err["msg"]))
    elif typ.startswith(("bad_", "unknown_", "empty_", "size_", "path_")):
        message = err["msg"]  # our own messages say what was expected and what was given
    else:
        message = f"{err['msg']} (got {got})"
    line, col = _mark(node)
    return RecipeProblem(file, line, col, _field_text(parts), message)
