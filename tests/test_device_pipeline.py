"""The whole recipe pipeline on every device, through the runner (issue #24).

One test body, three devices:

* ``cpu`` -- the reference, in CI;
* ``sim`` -- the simulated second device of ``device_sim`` (CI): the runner's device is
  one whose tensors refuse to meet CPU tensors, so any tensor a pass, the runner, the
  evaluator or the exporter creates on the host and combines with the model's fails here
  exactly as it would on CUDA;
* ``cuda`` -- ``gpu``-marked, for a GPU machine (``benchmarks/gpu_check.py`` runs it).

Recipes (tiny random models with the repo's own tokenizer, so a bare GPU machine needs no
cache or hub): a Llama and a Qwen3 (q/k norms, head_dim != hidden/heads) through
width + depth prune -> KD (bf16 autocast, as the recipe asks) -> GPTQ 4-bit (act-order,
static groups) -> QAD (trained scales) [-> GGUF export, Llama only: the exporter knows
llama/mistral], then the checkpoint and the GGUF file reloaded and evaluated; and a
streamed GPTQ 3-bit stage (layer on the device, everything else on the host). A streamed
teacher cache is built on the device and compared with the in-memory cache.

On CUDA every GPTQ layer is served by the Triton kernel (the reloaded checkpoint's layers,
whose perplexity equals the report's), and each stage's report must match the CPU
run of the same recipe within :data:`RTOL` (why each bound: see there).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from device_sim import HUB_KERNELS_ENV, SIM, simulated_device
from family_models import family_config
from repo_tokenizer import PRE_TOKENIZER, repo_tokenizer
from transformers import AutoModelForCausalLM

from slmcompress.data import EvalSpec, eval_tokens
from slmcompress.eval.perplexity import perplexity
from slmcompress.io.load import load_model
from slmcompress.quant.quant_linear import QuantLinear, cached_dequantization
from slmcompress.recipe import load_recipe
from slmcompress.runner import Runner

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only contend
CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ],
)
FAMILIES = ("llama", "qwen3")
VOCAB = 1024
EVAL = {"max_tokens": 1024, "seq_len": 128}

#: Largest relative difference from the CPU run of the same recipe, by kind of quantity.
#: * ``forward``: perplexities of stages with no training or rounding upstream (input,
#:   prune) and KD's first loss (computed before any update). fp32 on both devices (CUDA
#:   keeps TF32 off for fp32 matmuls by default), so the devices differ by reduction order
#:   only: ~1e-7 relative; 1e-4 on CUDA leaves room for its attention kernels. Pruning
#:   keeps the same units (asserted: the ranking gaps are far above 1e-6). With bf16
#:   autocast (KD's first loss on CUDA) a product rounds to 8 mantissa bits after an
#:   accumulation whose order differs between oneDNN and cuBLAS: 0.4% on some logits,
#:   averaging to ~1e-3 on the loss: 2e-2.
#: * ``trained``: perplexities after KD, GPTQ, QAD. Both are discontinuous in their
#:   inputs: AdamW's first steps move each weight by ~lr * sign(g), so any noise flips
#:   the update of weights whose gradient is near zero, and GPTQ flips a code where a
#:   weight sits near a rounding boundary. Measured on the simulated device, whose only
#:   difference from the CPU is attention's math path (~1e-7 on logits): kd 4.5e-4,
#:   gptq4 2.0e-3, qad 6.1e-3, and the streamed GPTQ-3 of the untrained model 9.4e-3 (one
#:   flipped code changes the OBS updates of the rest of its row: GPTQ is chaotic in its
#:   inputs). bf16's noise is 1e4 times larger but flips the same kind of near-ties; 5e-2
#:   is 5x the simulated worst case, while a real device bug (a wrong index, a dropped
#:   layer, a kernel serving the wrong group) moves perplexity by far more.
#: Every measured difference goes to the GPU check's results (``record``).
RTOL = {
    "sim": {"forward": 1e-6, "trained": 2e-2},
    "cuda": {"forward": 1e-4, "first_loss": 2e-2, "trained": 5e-2},
}
UNTRAINED = ("input", "prune")
TRITON = {"triton-int3", "triton-int4"}


def _model_dir(root: Path, family: str) -> Path:
    """A seeded random tiny model of ``family`` with the repo tokenizer (vocab 1024)."""
    directory = root / f"model-{family}"
    if not (directory / "config.json").is_file():
        config = family_config(family)
        # weights 5x the usual init: logits far from uniform, so KD has a real signal and
        # the stages' perplexities move by more than float noise
        config.vocab_size, config.initializer_range = VOCAB, 0.1
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # norms off 1 so slicing mistakes show
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(0.2 * torch.randn_like(param))
        model.save_pretrained(directory)
        repo_tokenizer(VOCAB).save_pretrained(directory)
    return directory


def chain_stages(family: str, autocast: str) -> list[dict]:
    """prune (width + depth) -> KD -> GPTQ-4 -> QAD [-> GGUF for Llama]."""
    train = {
        "max_steps": 3,
        "seq_len": 64,
        "micro_batch_size": 2,
        "lr": 1.0e-3,
        "eval_every": 0,
        "save_every": 0,
        "eval_tokens": 256,
        "autocast": autocast,
    }
    stages = [
        {
            "type": "prune",
            "name": "prune",
            "target": {"ffn_hidden_size": 96, "num_attention_heads": 2, "num_layers": 2},
            "align": "none",
            "n_samples": 4,
            "seq_len": 64,
        },
        {"type": "distill", "name": "kd", **train},
        {
            "type": "quantize",
            "name": "gptq4",
            "method": "gptq",
            "bits": 4,
            "group_size": 32 if family == "llama" else 16,
            "sym": True,
            "act_order": True,
            "static_groups": True,
            "n_samples": 8,
            "seq_len": 64,
        },
        {"type": "distill", "name": "qad", "quantized": "scales", **train},
    ]
    if family == "llama":  # the GGUF exporter writes llama/mistral only
        stages.append(
            {
                "type": "export",
                "name": "gguf",
                "format": "gguf",
                "outtype": "q4_0",
                "embedding_type": "f32",
                "pre_tokenizer": PRE_TOKENIZER,
                "runtime_eval": "off",
            }
        )
    return stages


def streamed_stages() -> list[dict]:
    """GPTQ 3-bit streamed from disk: one decoder layer on the device at a time."""
    return [
        {
            "type": "quantize",
            "name": "gptq3",
            "method": "gptq",
            "bits": 3,
            "group_size": 32,
            "act_order": True,
            "n_samples": 8,
            "seq_len": 64,
            "streaming": True,
        }
    ]


@dataclass
class PipelineRun:
    """Stage reports (by stage name) of one run, and where it wrote them."""

    out: Path
    reports: dict[str, dict]

    def ppl(self, stage: str) -> float:
        return self.reports[stage]["metrics"]["wikitext2_ppl"]

    def stage_dir(self, stage: str) -> Path:
        return next(self.out.glob(f"*-{stage}"))


_RUNS: dict[tuple, PipelineRun | BaseException] = {}


def run_pipeline(root: Path, family: str, device: str, recipe: str, autocast: str) -> PipelineRun:
    """Run (once per session) one recipe on one device through the real runner.

    A failed run is remembered too: the tests sharing it fail at once with its error
    instead of repeating it (on a GPU machine the check's time budget is short).
    """
    key = (family, device, recipe, autocast)
    if key not in _RUNS:
        try:
            _RUNS[key] = _run(root, key)
        except Exception as exc:  # noqa: BLE001 - re-raised below, for every test sharing it
            _RUNS[key] = exc
    if isinstance(_RUNS[key], BaseException):
        raise RuntimeError(f"the {'/'.join(key)} run failed: {_RUNS[key]}") from _RUNS[key]
    return _RUNS[key]


def _run(root: Path, key: tuple[str, str, str, str]) -> PipelineRun:
    family, device, recipe, autocast = key
    stages = chain_stages(family, autocast) if recipe == "chain" else streamed_stages()
    out = root / "-".join(key)
    data = {
        "name": f"device-{family}-{recipe}",
        "model": str(_model_dir(root, family)),
        "output_dir": str(out),
        "device": "cpu" if device == "sim" else device,
        "dtype": "float32",
        "seed": 0,
        "data": {"calibration": {"source": "c4", "n_samples": 8, "seq_len": 64}, "eval": EVAL},
        # no decode speed: its kernels (M = 1, prompt) are benchmarks/gpu_check.py's section c,
        # and each autotuned shape costs compile time on a GPU check with a fixed budget
        "eval": {"tasks": [], "speed": False},
        "stages": stages,
    }
    path = root / f"{'-'.join(key)}.yaml"
    path.write_text(yaml.safe_dump(data))
    runner = Runner(load_recipe(path))
    if device == "sim":
        runner.device = SIM  # what the recipe's device decides, for a device it cannot name
        with simulated_device():
            runner.run()
    else:
        runner.run()
    reports = {}
    for entry in sorted(out.iterdir()):
        if (entry / "report.json").is_file():
            report = json.loads((entry / "report.json").read_text())
            reports[report["stage"]] = report
    return PipelineRun(out, reports)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("device-pipeline")


@pytest.fixture(autouse=True, scope="module")
def _torch_code_only():
    """Every run (the CPU references too) uses the models' torch code, not optional hub
    kernels, which exist for some devices only: the devices compare the same arithmetic."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(HUB_KERNELS_ENV, "NO")
        yield


def _autocast(device: str) -> str:
    """The recipe asks for bf16 autocast in KD; the simulated device has no autocast
    (its tensors dispatch as meta), so it and its CPU reference train in fp32."""
    return "off" if device == "sim" else "bf16"


def record(name: str, values: dict) -> None:
    """Measured differences, for the GPU check's results (``SLMCOMPRESS_DEVICE_REPORT``)."""
    directory = os.environ.get("SLMCOMPRESS_DEVICE_REPORT")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"{name}.json").write_text(json.dumps(values, indent=1))


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------ the chain
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("device", ["cpu", "sim", CUDA])
def test_chain_runs_and_matches_cpu(root, family, device):
    autocast = _autocast(device)
    run = run_pipeline(root, family, device, "chain", autocast)
    expected = ["input", "prune", "kd", "gptq4", "qad"] + (["gguf"] if family == "llama" else [])
    assert list(run.reports) == expected
    for stage, report in run.reports.items():
        ppl = report["metrics"]["wikitext2_ppl"]
        assert ppl is not None and 1.0 < ppl < 10 * VOCAB, (stage, ppl)
    prune = run.reports["prune"]["extra"]["prune"]
    assert prune["sizes_after"]["num_layers"] == 2 and prune["sizes_after"]["ffn_hidden_size"] == 96
    for stage in ("kd", "qad"):
        assert run.reports[stage]["extra"]["distill"]["autocast"] == autocast
    assert run.reports["qad"]["extra"]["quantized"]["mode"] == "scales"
    if device == "cpu":
        return
    cpu = run_pipeline(root, family, "cpu", "chain", autocast)
    assert prune["kept_layers"] == cpu.reports["prune"]["extra"]["prune"]["kept_layers"]
    rtol = RTOL[device]
    diffs = {s: relative(run.ppl(s), cpu.ppl(s)) for s in ("input", "prune", "kd", "gptq4", "qad")}
    first = [run.reports["kd"]["extra"]["distill"]["first_loss"]]
    first.append(cpu.reports["kd"]["extra"]["distill"]["first_loss"])
    diffs["kd_first_loss"] = relative(*first)
    ppl = {s: [run.ppl(s), cpu.ppl(s)] for s in run.reports}
    tf32 = torch.backends.cuda.matmul.allow_tf32  # RTOL's "forward" bound assumes it off
    record(f"chain-{family}-{device}", {"ppl_device_cpu": ppl, "rel_diff": diffs, "tf32": tf32})
    for name, diff in diffs.items():
        kind = "forward" if name in UNTRAINED else "trained"
        bound = rtol.get("first_loss", rtol["forward"]) if name == "kd_first_loss" else rtol[kind]
        assert diff <= bound, (name, diff, bound, diffs)


def reload_and_evaluate(run: PipelineRun, stage: str, device: str) -> tuple[set[str], float]:
    """Load a stage's checkpoint with ``load_model`` onto the device: the backends its GPTQ
    layers got, and its perplexity measured as the report measured it."""
    target = SIM if device == "sim" else torch.device(device)
    with simulated_device() if device == "sim" else contextlib.nullcontext():
        loaded = load_model(str(run.stage_dir(stage)), dtype="float32", device=target)
        layers = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
        assert layers and all(m.qweight.device.type == target.type for m in layers)
        tokens = eval_tokens(loaded.tokenizer, EvalSpec(**EVAL))
        with cached_dequantization(loaded.model):  # as evaluate() does (CPU layers: fp32)
            ppl = perplexity(loaded.model, tokens, EVAL["seq_len"]).ppl
    return {m.backend for m in layers}, ppl


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("device", ["cpu", "sim", CUDA])
def test_quantized_checkpoint_reloads_on_the_device(root, family, device):
    """``load_model`` puts every GPTQ layer on the device's serving path (CUDA: the Triton
    kernel) and scores the report's perplexity, so the report was measured on that path."""
    run = run_pipeline(root, family, device, "chain", _autocast(device))
    backends, ppl = reload_and_evaluate(run, "qad", device)
    assert backends == {"triton-int4"} if device == "cuda" else not backends & TRITON
    assert relative(ppl, run.ppl("qad")) <= 1e-5  # same path; fp32 atomics may reorder on CUDA


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "sim", CUDA])
def test_gguf_export_reloads_and_evaluates_on_the_device(root, device):
    """The exported file, read back by transformers' GGUF loader onto the device, scores
    the QAD stage's perplexity: its Q4_0 blocks hold the GPTQ codes unchanged."""
    run = run_pipeline(root, "llama", device, "chain", _autocast(device))
    export = run.reports["gguf"]["extra"]
    assert export["gguf_gptq_transferred"] > 0 and export["gguf_transfer_max_abs_err"] == 0.0
    gguf_file = next(run.stage_dir("gguf").glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    target = SIM if device == "sim" else torch.device(device)
    with simulated_device() if device == "sim" else contextlib.nullcontext():
        model.to(target)
        tokens = eval_tokens(repo_tokenizer(VOCAB), EvalSpec(**EVAL))
        ppl = perplexity(model, tokens, EVAL["seq_len"]).ppl
    record(f"gguf-{device}", {"gguf_ppl": ppl, "qad_ppl": run.ppl("qad")})
    assert relative(ppl, run.ppl("qad")) <= 1e-3


# ------------------------------------------------------------------ streamed stages
@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "sim", CUDA])
def test_streamed_gptq3_runs_and_matches_cpu(root, device):
    run = run_pipeline(root, "llama", device, "streamed", "off")
    report = run.reports["gptq3"]
    assert report["extra"]["streamed_from"]
    assert report["extra"]["quantized_linears"] > 0
    backends, ppl = reload_and_evaluate(run, "gptq3", device)
    assert backends == {"triton-int3"} if device == "cuda" else not backends & TRITON
    assert relative(ppl, run.ppl("gptq3")) <= 1e-5
    if device == "cpu":
        return
    cpu = run_pipeline(root, "llama", "cpu", "streamed", "off")
    diff = relative(run.ppl("gptq3"), cpu.ppl("gptq3"))
    record(
        f"streamed-gptq3-{device}",
        {"ppl_device_cpu": [run.ppl("gptq3"), cpu.ppl("gptq3")], "rel_diff": diff},
    )
    assert diff <= RTOL[device]["trained"]  # GPTQ's rounding: see RTOL


@pytest.mark.parametrize("device", ["sim", CUDA])
def test_streamed_teacher_cache_on_the_device_matches_cpu(root, device):
    """Top-k teacher logits streamed layer by layer on the device (activations on the host)
    equal the in-memory CPU cache's: same indices, values within fp32 kernel differences."""
    from slmcompress.data import DataSpec
    from slmcompress.distill.teacher_cache import (
        TeacherCache,
        build_streamed_teacher_cache,
        build_teacher_cache,
    )

    model_dir = _model_dir(root, "llama")
    tokenizer = repo_tokenizer(VOCAB)
    spec = DataSpec(source="c4")
    common = dict(tokenizer=tokenizer, data_spec=spec, seq_len=64, top_k=8, n_sequences=6)
    cpu_dir, dev_dir = root / f"cache-cpu-{device}", root / f"cache-{device}"
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    build_teacher_cache(loaded.model, out_dir=cpu_dir, shard_size=4, show_progress=False, **common)
    target = SIM if device == "sim" else torch.device(device)
    # CUDA: two shards, so the streamed model is reloaded once; the simulated device labels
    # its tensors "meta", which the streaming loader reads as "not loaded yet", so there
    # the model must be materialised only once: one shard
    shard_size = 8 if device == "sim" else 4
    with simulated_device() if device == "sim" else contextlib.nullcontext():
        build_streamed_teacher_cache(
            model_dir, out_dir=dev_dir, device=target, dtype=torch.float32, batch_size=2,
            shard_size=shard_size, max_memory="8GB", show_progress=False, **common,
        )  # fmt: skip
    ids = torch.arange(6)
    expected, got = TeacherCache(cpu_dir).targets(ids), TeacherCache(dev_dir).targets(ids)
    assert torch.equal(TeacherCache(cpu_dir).tokens(), TeacherCache(dev_dir).tokens())
    same = (got.indices == expected.indices).float().mean().item()
    err = (got.values - expected.values).abs().max().item()
    record(f"teacher-cache-{device}", {"same_indices": same, "max_abs_value_err": err})
    assert same >= 0.99  # a near-tie between the 8th and 9th logit may swap under fp32 noise
    assert err <= 1e-3
