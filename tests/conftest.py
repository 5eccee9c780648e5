"""Shared fixtures: the real built-in model (session-scoped), tiny random Llamas, contexts."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from slmcompress.data import CalibrationSpec, DataConfig, EvalSpec  # noqa: E402
from slmcompress.passes.base import Context  # noqa: E402


@pytest.fixture(scope="session")
def real_model():
    """The real SmolLM2-135M (float32, CPU). Treat as read-only: deep-copy before changing it."""
    from slmcompress.io.load import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(real_model):
    """The real SmolLM2 tokenizer (vocab 49152); tiny models share its vocabulary."""
    return real_model.tokenizer


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A small Llama with the real tokenizer's vocabulary and GQA, fast on CPU."""
    params = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    params.update(overrides)
    return LlamaConfig(**params)


@pytest.fixture
def tiny_llama():
    """A fresh random tiny Llama (seeded), float32, eval mode."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def make_ctx(tmp_path: Path, tokenizer):
    """Factory for a pass Context on CPU with small calibration/eval budgets."""

    def make(**overrides) -> Context:
        data = overrides.pop("data", None) or DataConfig(
            calibration=CalibrationSpec(source="c4", n_samples=8, seq_len=64),
            eval=EvalSpec(max_tokens=512, seq_len=128),
        )
        params = dict(
            tokenizer=tokenizer,
            data=data,
            device=torch.device("cpu"),
            dtype=torch.float32,
            original_model="smollm2-135m",
            teacher=None,
            stage_dir=tmp_path / "stage",
            work_dir=tmp_path / "work",
            seed=0,
        )
        params.update(overrides)
        return Context(**params)

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama saved as a HF directory with the real tokenizer (a model source)."""
    directory = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_recipe(path: Path, model: str, stages: list[dict], output_dir: Path, **extra) -> Path:
    """Write a small recipe for a tiny model (fast eval budget, no tasks)."""
    import yaml

    data = {
        "name": extra.pop("name", "tiny"),
        "model": model,
        "output_dir": str(output_dir),
        "stages": stages,
        "data": {
            "calibration": {"source": "c4", "n_samples": 4, "seq_len": 64},
            "eval": {"max_tokens": 512, "seq_len": 128},
        },
        "eval": {"tasks": [], "speed": False},
    }
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def single_thread():
    """Tiny matmuls on a shared 2-core box are far faster without OpenMP threads spinning.

    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def stream_from(directory: Path, dtype: torch.dtype = torch.float32):
    """What the runner hands a pass for a streamed stage: a weightless skeleton + residency."""
    from slmcompress.streaming.loader import build_skeleton
    from slmcompress.streaming.residency import Residency

    return build_skeleton(Path(directory), dtype), Residency("streamed", Path(directory))
