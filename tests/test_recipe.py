"""Recipe validation matrix: every bad input is one RecipeError/SlmError line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slmcompress.errors import SlmError
from slmcompress.io.sources import BUILTIN_MODELS
from slmcompress.recipe import apply_overrides, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]


def base(**overrides) -> dict:
    data = {"name": "t", "model": "smollm2-135m", "stages": [{"type": "quantize", "method": "rtn"}]}
    data.update(overrides)
    return data


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (base(foo=1), "foo: unknown key"),
        (base(stages=[{"type": "shrink"}]), "stages[0].type: unknown pass type 'shrink'"),
        (base(stages=[{"type": "quantize"}]), "stages[0].method: quantize needs a method"),
        (
            base(stages=[{"type": "quantize", "method": "magic"}]),
            "stages[0].method: unknown quantize method",
        ),
        (
            base(stages=[{"type": "quantize", "method": "rtn", "bits": 5}]),
            "stages[0].bits: must be one of 2, 3, 4, 8",
        ),
        (
            base(stages=[{"type": "quantize", "method": "rtn", "group_size": 0}]),
            "stages[0].group_size:",
        ),
        (
            base(stages=[{"type": "quantize", "method": "rtn", "group_size": -2}]),
            "stages[0].group_size:",
        ),
        (
            base(stages=[{"type": "quantize", "method": "rtn", "bitz": 4}]),
            "stages[0].bitz: unknown key",
        ),
        (base(stages=[]), "stages:"),
        (base(seed="x"), "seed:"),
        (base(model="./does/not/exist"), "model: path ./does/not/exist does not exist"),
        (base(teacher="/nope/teacher"), "teacher: path /nope/teacher does not exist"),
        (base(dtype="float128"), "dtype: unknown dtype"),
        (base(max_memory="lots"), "max_memory: memory size 'lots': expected a number with a unit"),
        (
            base(data={"calibration": {"source": "wikitext2", "split": "test"}}),
            "data.calibration: uses the evaluation data",
        ),
        (
            base(data={"calibration": {"source": "c4", "split": "train"}}),
            "data.calibration.split: c4 has no split 'train'",
        ),
        (
            base(data={"calibration": {"source": "/nope/calib.jsonl"}}),
            "data.calibration.source: data file",
        ),
        (base(eval={"tasks": ["mmlu"]}), "eval.tasks: unknown task 'mmlu'"),
        (
            base(stages=[{"type": "eval", "name": "a"}, {"type": "eval", "name": "a"}]),
            "stages[1].name:",
        ),
        (
            base(
                stages=[
                    {"type": "quantize", "method": "rtn"},
                    {"type": "quantize", "method": "rtn", "name": "b"},
                ]
            ),
            "stages[1].type: a quantize stage cannot follow the quantize stage",
        ),
    ],
)
def test_bad_recipes_fail_with_one_line_naming_the_field(data, expected):
    with pytest.raises(SlmError) as info:
        parse_recipe(data)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_group_size_minus_one_and_ragged_groups_are_valid():
    for group_size in (-1, 128, 100000):
        resolved = parse_recipe(
            base(stages=[{"type": "quantize", "method": "rtn", "group_size": group_size}])
        )
        assert resolved.stages[0].config.group_size == group_size


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(SlmError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(SlmError, match=r"invalid YAML \(line \d+, column \d+\)"):
        load_recipe(write(tmp_path, "name: a\nstages: [\n  - {type: eval\n"))
    with pytest.raises(SlmError, match="top level must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_empty_data_file_and_dir_without_config(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SlmError, match="is empty"):
        parse_recipe(base(data={"calibration": {"source": str(empty)}}))
    (tmp_path / "model").mkdir()
    with pytest.raises(SlmError, match="has no config.json"):
        parse_recipe(base(model=str(tmp_path / "model")))


def test_overrides_and_stage_hash_chain(tmp_path):
    path = write(
        tmp_path,
        base(
            stages=[
                {"type": "quantize", "method": "rtn", "bits": 4},
                {"type": "eval", "name": "after"},
            ]
        ),
    )
    a = load_recipe(path)
    b = load_recipe(path, ["stages.0.bits=3"])
    assert b.stages[0].config.bits == 3
    # changing stage 0 changes every later hash (later stages are invalidated)
    assert a.stage_hashes()[0] != b.stage_hashes()[0]
    assert a.stage_hashes()[1] != b.stage_hashes()[1]
    with pytest.raises(SlmError, match="not a valid index"):
        apply_overrides(base(), ["stages.7.bits=3"])


def test_runtime_settings_leave_the_stage_hash_alone(tmp_path):
    stage = {"type": "quantize", "method": "gptq", "bits": 4}
    path = write(tmp_path, base(stages=[stage, {"type": "eval", "name": "after"}]))
    a = load_recipe(path)
    # how a stage runs is not what it produces: a new memory budget resumes, never re-runs
    b = load_recipe(path, ["stages.0.max_memory=2GB", "stages.0.streaming=true"])
    assert b.stage_hashes() == a.stage_hashes()
    assert load_recipe(path, ["stages.0.damp_percent=0.1"]).stage_hashes() != a.stage_hashes()


def test_every_shipped_recipe_validates():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        resolved = load_recipe(path)
        assert resolved.recipe.model in BUILTIN_MODELS, path
