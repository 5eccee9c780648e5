"""Memory model: sizes, published configs, recipe plans for a 70B model on a GPU and this CPU."""

from __future__ import annotations

import json

import pytest
from conftest import write_recipe

from slmcompress.errors import RecipeError
from slmcompress.memory_model import (
    PROFILES,
    PUBLISHED_CONFIGS,
    ModelDims,
    estimate_calibration_pass,
    parse_bytes,
)
from slmcompress.plan import _after_stage, plan_recipe, plan_to_dict, render_plan
from slmcompress.recipe import load_recipe

GiB = 2**30


@pytest.mark.parametrize(
    "text, expected",
    [
        ("80GB", 80 * 10**9),
        ("24GiB", 24 * GiB),
        ("512MiB", 512 * 2**20),
        ("1.5G", 1_500_000_000),
        (1000, 1000),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_garbage():
    with pytest.raises(RecipeError, match="memory size"):
        parse_bytes("lots")


def test_published_parameter_counts():
    assert ModelDims.from_config(PUBLISHED_CONFIGS["llama-3-70b"]).params() == pytest.approx(
        70.55e9, rel=0.01
    )
    assert ModelDims.from_config(PUBLISHED_CONFIGS["llama-3-8b"]).params() == pytest.approx(
        8.03e9, rel=0.01
    )
    assert ModelDims.from_config(PUBLISHED_CONFIGS["smollm2-135m"]).params() == pytest.approx(
        134.5e6, rel=0.01
    )


def test_70b_on_this_machine_importance_fits_gptq_is_flagged():
    arch = ModelDims.from_config(PUBLISHED_CONFIGS["llama-3-70b"])
    importance = estimate_calibration_pass(
        arch, "importance", 128, 2048, 1, 2, PROFILES["cpu-2core"]
    )
    assert importance.streaming and importance.host_peak < 24 * GiB
    cpu = estimate_calibration_pass(arch, "gptq", 128, 2048, 1, 2, PROFILES["cpu-2core"])
    # the fp32 Hessian work of a 28672-wide down_proj alone is ~10+ GiB: honest "does not fit"
    assert cpu.streaming and any("exceeds host memory" in n for n in cpu.notes)
    assert cpu.disk > 35e9  # 4-bit output (x2 while assembling) + spilled activations
    gpu = estimate_calibration_pass(
        arch, "gptq", 128, 2048, 1, 2, PROFILES["h100"], host_budget=120 * GiB
    )
    assert gpu.streaming and gpu.device_peak < 80e9 and gpu.time_s < cpu.time_s / 100


@pytest.fixture
def gptq_recipe(tmp_path, tiny_model_dir):
    stages = [{"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32}]
    return load_recipe(
        write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), stages, tmp_path / "out")
    )


def test_plan_recipe_for_its_own_model(gptq_recipe):
    (plan,) = plan_recipe(gptq_recipe)
    assert plan.pass_name == "quantize.gptq" and not plan.streaming
    assert 0 < plan.host_peak < 4 * GiB
    assert "quantize.gptq" in render_plan([plan])


def test_plan_recipe_for_70b_on_one_h100_and_on_this_cpu(gptq_recipe):
    gpu_plan = plan_recipe(
        gptq_recipe, device_memory="80GB", host_memory="128GiB", config="llama-3-70b"
    )
    # the 70B's input report and its 4-bit output are evaluated by a streamed forward
    assert [p.stage for p in gpu_plan] == ["input eval", "quantize-gptq", "quantize-gptq eval"]
    assert all(p.streaming and p.device_peak < 80e9 for p in gpu_plan)
    gpu = gpu_plan[1]
    cpu = plan_recipe(gptq_recipe, host_memory="24GiB", config="llama-3-70b")[1]
    assert gpu.streaming and cpu.streaming
    assert gpu.device_peak < 80e9 and not any("exceeds" in n for n in gpu.notes)
    assert cpu.time_s > 100 * gpu.time_s
    assert plan_to_dict([gpu])[0]["stage"] == "quantize-gptq"


def test_plan_cli_json(gptq_recipe, tmp_path):
    from typer.testing import CliRunner

    from slmcompress.cli import app

    result = CliRunner().invoke(
        app,
        [
            "plan",
            str(gptq_recipe.source_path),
            "--config",
            "llama-3-70b",
            "--device-memory",
            "80GB",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    (row,) = json.loads(result.stdout)
    assert row["pass_name"] == "quantize.gptq" and row["device_peak"] < 80e9


def test_plan_a_70b_recipe_whose_model_is_not_on_this_machine(tmp_path):
    """`plan --config` needs only the recipe: the model directory may live elsewhere."""
    from typer.testing import CliRunner

    from slmcompress.cli import app

    recipe = write_recipe(
        tmp_path / "r.yaml",
        "/models/Meta-Llama-3-70B",
        [{"type": "quantize", "method": "gptq", "bits": 4, "group_size": 128}],
        tmp_path / "out",
        max_memory="120GiB",
    )
    args = ["plan", str(recipe), "--config", "llama-3-70b", "--host-memory", "128GiB"]
    result = CliRunner().invoke(app, [*args, "--device-memory", "80GB"])
    assert result.exit_code == 0, result.output
    assert "quantize.gptq" in result.output and "yes" in result.output  # streams: 141 GB > 120 GiB
    missing = CliRunner().invoke(app, ["plan", str(recipe)])  # no --config: the model must exist
    assert missing.exit_code != 0 and "does not exist" in missing.output


def test_plan_of_a_distill_stage_whose_teacher_is_over_the_budget(tmp_path, tiny_model_dir):
    from slmcompress.memory_model import (
        compute_bound_tokens,
        estimate_streamed_forward,
        load_config,
    )

    stages = [{"type": "distill", "top_k": 64, "max_tokens": 10_000_000, "seq_len": 2048}]

    def distill_plan(max_memory):
        path = write_recipe(
            tmp_path / "r.yaml", str(tiny_model_dir), stages, tmp_path / "o", max_memory=max_memory
        )
        plans = plan_recipe(
            load_recipe(path), device_memory="80GB", host_memory="128GiB", config="llama-3-70b"
        )
        return next(p for p in plans if p.pass_name == "distill")

    streamed, resident = distill_plan("120GiB"), distill_plan("4TB")
    assert any("streamed into a top-64 cache" in n for n in streamed.notes)
    assert not any("cache" in n for n in resident.notes)
    # the 70B bf16 teacher (141 GB) is never resident when streamed
    assert resident.device_peak - streamed.device_peak > 140e9
    assert streamed.time_s > resident.time_s  # the cache pass comes first
    arch = ModelDims.from_config(load_config("llama-3-70b"))
    cache = estimate_streamed_forward(
        arch, 4883, 2048, 4, 2, PROFILES["h100"], 128 * GiB, top_k=64, chunk_sequences=256
    )
    assert cache.disk >= 10_000_000 * 64 * 8  # the cache itself: fp32 values + int32 indices
    # a 512k-token pass is compute-bound on the H100 profile; the default shard is enough
    assert 256 * 2048 > compute_bound_tokens(2, PROFILES["h100"]) == 75_000


def test_plan_counts_a_prune_re_fit_time_and_its_70b_working_set(tmp_path, tiny_model_dir):
    """``reconstruct`` adds a second layer loop (Grams and solves of down_proj): plan says so."""

    def plan_of(**extra):
        stage = {"type": "prune", "target": {"ffn_hidden_size": 64}} | extra
        recipe = load_recipe(
            write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), [stage], tmp_path / "o")
        )
        return plan_recipe(recipe, config="llama-3-70b", host_memory="128GiB")[1]

    plain = plan_of()
    refit = plan_of(reconstruct={"select": "importance"})
    assert refit.time_s > 2 * plain.time_s  # 2.5 forwards + Grams + solves vs one forward
    # the fp32 Gram + fp64 solve of a 28672-wide down_proj: several GiB more per layer
    assert refit.host_peak > plain.host_peak + 8 * GiB
    energy = plan_of(reconstruct=True)  # chooses units itself: no scoring pass to plan
    assert energy.time_s < refit.time_s


@pytest.mark.parametrize(
    ("target", "head_pruning", "kv_heads"),
    [
        ({"num_attention_heads": 2}, "within_groups", 2),  # each group loses query heads
        ({"num_attention_heads": 2}, "kv_groups", 1),  # whole groups go: 4/2 -> 2/1
        ({"num_attention_heads": 2, "num_key_value_heads": 1}, "within_groups", 1),
    ],
)
def test_a_prune_stage_changes_the_kv_heads_the_next_stage_is_planned_with(
    tmp_path, tiny_model_dir, target, head_pruning, kv_heads
):
    """The stage after a head prune is planned on the pruned shape: KV heads follow the
    target (or ``head_pruning``), head_dim stays."""
    stage = {"type": "prune", "target": target, "head_pruning": head_pruning}
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), [stage], tmp_path / "o")
    )
    before = ModelDims.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    after = _after_stage(recipe.stages[0], before)
    assert (after.heads, after.kv_heads, after.head_dim) == (2, kv_heads, before.head_dim)
    assert after.linears()["k_proj"] == (before.hidden, kv_heads * before.head_dim)
