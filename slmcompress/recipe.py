"""YAML recipes: strict pydantic schema, ``--set`` overrides, whole-recipe validation up front.

Everything a recipe can get wrong is reported before any weight loads, as one line that
names the field path (``stages[1].bits: ...``).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slmcompress.data import (
    DataConfig,
    EvalOptions,
    check_disjoint,
    check_spec,
)
from slmcompress.errors import ModelSourceError, RecipeError, SlmError, one_line
from slmcompress.fsutil import regular_file_problem
from slmcompress.io.remote_code import RECIPE_OPT_IN, remote_code
from slmcompress.io.sources import check_model_source, resolve_dtype
from slmcompress.memory_model import parse_bytes
from slmcompress.passes import get_pass
from slmcompress.passes.base import RUNTIME_FIELDS, Pass, PassConfig


class Recipe(BaseModel):
    """Top level of a recipe file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    model: str = Field(min_length=1)
    teacher: str | None = None
    data: DataConfig = DataConfig()
    output_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    stages: list[dict[str, Any]] = Field(min_length=1)
    eval: EvalOptions = EvalOptions()
    # host memory budget ("24GiB"): models above it are streamed by the passes that can
    # (GPTQ, prune) and not loaded for evaluation; stages may set their own max_memory
    max_memory: str | None = None

    @field_validator("max_memory")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_bytes(value)
            except SlmError as exc:
                raise ValueError(str(exc)) from exc
        return value

    # run model-supplied code (a checkpoint's auto_map modules); never without this opt-in
    trust_remote_code: bool = False

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        problem = path_name_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return device


#: a name becomes a directory name (``NN-name`` plus a temp suffix while it is written)
MAX_NAME_BYTES = 200


#: punctuation a name may hold besides letters and digits (of any script)
NAME_PUNCTUATION = "-_.+"


def path_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a run or stage directory name, or ``None`` if it can.

    Allowed: letters and digits of any script (with their combining marks) and
    ``- _ . +``. Everything else is refused, notably the invisible format characters
    (U+202E RIGHT-TO-LEFT OVERRIDE can make ``01-w4\u202eexe.sh`` display as another
    name), spaces, shell metacharacters and path separators.
    """
    if "/" in name or "\\" in name or name.startswith("."):
        return "must not contain '/' or '\\' or start with '.'"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "must not contain control characters (NUL, newline, ...)"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"is {len(name.encode('utf-8'))} bytes long; at most {MAX_NAME_BYTES}"
    for position, ch in enumerate(name):
        if ch in NAME_PUNCTUATION or unicodedata.category(ch)[0] in "LN":
            continue
        if unicodedata.category(ch) in ("Mn", "Mc") and position > 0:
            continue
        label = unicodedata.name(ch, "unnamed character")
        return (
            f"may contain only letters, digits and {' '.join(NAME_PUNCTUATION)}; "
            f"found U+{ord(ch):04X} {label} at position {position}"
        )
    return None


@dataclass(frozen=True)
class Stage:
    """One resolved stage: its index, directory name, pass class and validated config."""

    index: int
    name: str
    pass_cls: type[Pass]
    config: PassConfig

    @property
    def dirname(self) -> str:
        return f"{self.index + 1:02d}-{self.name}"


@dataclass(frozen=True)
class ResolvedRecipe:
    """A validated recipe, ready to run."""

    recipe: Recipe
    stages: list[Stage]
    source_path: Path | None

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output_dir or Path("runs") / self.recipe.name)

    def identity(self) -> dict[str, Any]:
        """What makes two runs "the same recipe" for refusing to mix them in one output_dir."""
        return {"name": self.recipe.name, "model": self.recipe.model}

    def stage_hashes(self) -> list[str]:
        """Chained config hashes: a stage's hash covers every earlier stage and the inputs."""
        base = {
            "model": self.recipe.model,
            "teacher": self.recipe.teacher,
            "seed": self.recipe.seed,
            "dtype": self.recipe.dtype,
            "data": self.recipe.data.model_dump(),
        }
        previous = _hash(base)
        hashes = []
        for stage in self.stages:
            config = stage.config.model_dump(exclude=RUNTIME_FIELDS)
            previous = _hash({"previous": previous, "name": stage.name, "config": config})
            hashes.append(previous)
        return hashes

    def eval_hash(self) -> str:
        """Hash of what the reports measure (a change re-evaluates without re-running passes)."""
        return _hash(
            {"eval": self.recipe.eval.model_dump(), "data": self.recipe.data.eval.model_dump()}
        )


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """First pydantic error as ``path.to.field: message``."""
    err = exc.errors()[0]
    path = prefix
    for part in err["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected', '').replace(' or ', ', ')}"
    else:
        message = err["msg"].removeprefix("Value error, ")
    return f"{path or 'recipe'}: {message}"


#: a recipe is a few kB; a bigger file is not one (and is never read whole)
MAX_RECIPE_BYTES = 10 * 2**20
#: recipes nest 4-5 levels; far deeper YAML is an accident or an attack (RecursionError)
MAX_RECIPE_DEPTH = 32


def read_recipe_file(path: Path) -> dict[str, Any]:
    """Read a YAML file with ``yaml.safe_load``; every failure is a one-line RecipeError.

    A directory, a FIFO or a device (``/dev/zero``) is refused before it is opened.
    """
    path = Path(path)
    problem = regular_file_problem(path)
    if problem:
        raise RecipeError(f"recipe file {path} {problem}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {path} is larger than {MAX_RECIPE_BYTES} bytes")
    try:
        data = _safe_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"recipe file {path}: invalid YAML{where}: {problem}") from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe file {path}: not UTF-8 text") from exc
    except _TooDeep:
        raise RecipeError(
            f"recipe file {path}: nested deeper than {MAX_RECIPE_DEPTH} levels"
        ) from None
    except OSError as exc:
        raise RecipeError(f"recipe file {path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path}: top level must be a mapping of keys")
    return data


class _TooDeep(Exception):
    """YAML nested beyond :data:`MAX_RECIPE_DEPTH` (would exhaust Python's recursion limit)."""


def _safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` that turns a RecursionError, or a result nested too deep, into _TooDeep."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise _TooDeep from None
    if _depth(data) > MAX_RECIPE_DEPTH:
        raise _TooDeep
    return data


def _depth(value: Any) -> int:
    """Nesting depth of lists/dicts, computed without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            if level > MAX_RECIPE_DEPTH:
                return level
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children)
    return deepest


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (``stages.2.bits=3``); values parse as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key.path=value")
        path, raw = item.split("=", 1)
        value = _override_value(path, raw)
        node: Any = data
        parts = path.split(".")
        for part in parts[:-1]:
            node = _child(node, part, path, create=True)
        last = parts[-1]
        if not isinstance(node, (dict, list)):
            parent = ".".join(parts[:-1])
            raise RecipeError(f"--set {path}: {parent!r} is a value, not a mapping or list")
        if isinstance(node, list):
            node[_index(node, last, path)] = value
        else:
            node[last] = value
    return data


def _override_value(path: str, raw: str) -> Any:
    """A ``--set`` value parsed as YAML (safe_load: a ``!!python`` tag is refused, not run)."""
    try:
        return _safe_yaml(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"--set {path}: invalid value: {one_line(problem)}") from None
    except _TooDeep:
        raise RecipeError(f"--set {path}: nested deeper than {MAX_RECIPE_DEPTH} levels") from None


def _index(node: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(
            f"--set {path}: {part!r} is not a valid index (list has {len(node)} items)"
        )
    return int(part)


def _child(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise RecipeError(f"--set {path}: cannot descend into {part!r}")
    if part not in node and create:
        node[part] = {}
    return node[part]


def parse_recipe(
    data: dict[str, Any], source_path: Path | None = None, check_sources: bool = True
) -> ResolvedRecipe:
    """Validate a recipe mapping: top level, every stage, and cross-stage rules.

    ``check_sources=False`` skips the checks that the model and data exist (for planning a
    recipe on a machine that does not hold its model).
    """
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc)) from exc
    stages = [_parse_stage(i, raw) for i, raw in enumerate(recipe.stages)]
    resolved = ResolvedRecipe(recipe=recipe, stages=stages, source_path=source_path)
    with remote_code(recipe.trust_remote_code, RECIPE_OPT_IN):
        _validate_cross_stage(resolved, check_sources)
    return resolved


def _parse_stage(index: int, raw: Any) -> Stage:
    where = f"stages[{index}]"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: must be a mapping with a 'type' key")
    if "type" not in raw:
        raise RecipeError(
            f"{where}.type: missing (valid types are listed by `slmcompress recipe passes`)"
        )
    pass_cls = get_pass(str(raw["type"]), raw.get("method"), where)
    try:
        config = pass_cls.Config.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, prefix=where)) from exc
    default = raw["type"] if "method" not in raw else f"{raw['type']}-{raw['method']}"
    name = config.name or default
    return Stage(index=index, name=name, pass_cls=pass_cls, config=config)


def _validate_cross_stage(resolved: ResolvedRecipe, check_sources: bool = True) -> None:
    recipe = resolved.recipe
    names = [s.name for s in resolved.stages]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise RecipeError(
                f"stages[{i}].name: {name!r} is used by an earlier stage; names must be unique"
            )
        problem = path_name_problem(name)
        if problem:
            raise RecipeError(f"stages[{i}].name: {problem}")
    resolve_dtype(recipe.dtype)
    if check_sources:
        check_model_source(recipe.model)
        if recipe.teacher:
            try:
                check_model_source(recipe.teacher)
            except ModelSourceError as exc:
                raise ModelSourceError("teacher" + str(exc).removeprefix("model")) from exc
        check_spec(recipe.data.calibration, "data.calibration")
        check_spec(recipe.data.eval, "data.eval")
    check_disjoint(recipe.data.calibration, recipe.data.eval)
    quantized_at = next(
        (s.index for s in resolved.stages if s.pass_cls.pass_type == "quantize"), None
    )
    for stage in resolved.stages:
        if quantized_at is not None and stage.index > quantized_at:
            _check_after_quantize(stage, resolved.stages[quantized_at])
        if check_sources:
            stage.config.validate_against(recipe, stage.index)


#: quantize methods whose output (GPTQ v1 QuantLinears) a distill stage can train further
TRAINABLE_QUANT_METHODS = ("gptq", "rtn")


def _check_after_quantize(stage: Stage, quantize: Stage) -> None:
    """After quantizing: stages that only read the model (eval, export), and distill stages
    that keep it quantized (QAD)."""
    kind = stage.pass_cls.pass_type
    if not stage.pass_cls.changes_model:
        return
    method = quantize.pass_cls.pass_method
    if kind == "distill" and method in TRAINABLE_QUANT_METHODS:
        return
    where = f"stages[{stage.index}].type"
    if kind == "distill":
        raise RecipeError(
            f"{where}: a distill stage cannot train the {method} model of stages[{quantize.index}] "
            f"(quantized distillation trains GPTQ v1 checkpoints: method "
            f"{' or '.join(TRAINABLE_QUANT_METHODS)})"
        )
    raise RecipeError(
        f"{where}: a {kind} stage cannot follow the quantize stage stages[{quantize.index}]; "
        "quantize last (only eval, export and quantized distill stages may follow)"
    )


def load_recipe(
    path: Path, overrides: list[str] | None = None, check_sources: bool = True
) -> ResolvedRecipe:
    """Read, override and validate a recipe file."""
    data = apply_overrides(read_recipe_file(Path(path)), overrides or [])
    return parse_recipe(data, source_path=Path(path), check_sources=check_sources)
