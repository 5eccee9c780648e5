"""Bit-identity harness for refactors: hash every checkpoint a fixed set of runs writes.

Run it with the code tree under test first on ``PYTHONPATH`` ("before"), then again after
the change; every line of the two outputs must match::

    PYTHONPATH=/path/to/tree python benchmarks/arch_identity.py /tmp/out > hashes.txt

Cases (each a real ``run_recipe``, so the runner's residency decision is exercised):

- ``smollm2-gptq-mem``: GPTQ-4 g128 act_order on the built-in SmolLM2-135M, in memory;
- ``smollm2-gptq-stream``: the same stage forced to stream (``streaming: true``) under a
  small ``max_memory``, activations offloaded to disk;
- ``tiny-prune-stream`` / ``tiny-prune-mem``: activation pruning (+ GPTQ) of a seeded tiny
  random Llama saved as several shards, over the budget (streamed) and in memory.

Prints ``<case>/<stage>/<file> <sha256>`` for every ``*.safetensors`` file, sorted.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import yaml  # noqa: E402

DATA = {
    "calibration": {"source": "c4", "n_samples": 16, "seq_len": 256},
    "eval": {"max_tokens": 512, "seq_len": 256},
}
EVAL = {"tasks": [], "speed": False}
GPTQ_W4 = {
    "type": "quantize",
    "name": "w4",
    "method": "gptq",
    "bits": 4,
    "group_size": 128,
    "act_order": True,
}
PRUNE = {
    "type": "prune",
    "name": "width",
    "target": {"ffn_hidden_size": 64, "num_attention_heads": 2},
    "depth_metric": "cosine",
    "align": "none",
}
GPTQ_TINY = {"type": "quantize", "name": "w4", "method": "gptq", "bits": 4, "group_size": 32}


def _run(path: Path, recipe: dict) -> None:
    from slmcompress.recipe import load_recipe
    from slmcompress.runner import run_recipe

    path.write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(path))


def _recipe(name: str, model: str, stages: list[dict], out: Path, **extra) -> dict:
    return {
        "name": name,
        "model": model,
        "output_dir": str(out),
        "data": DATA,
        "eval": EVAL,
        "stages": stages,
        "seed": 0,
        **extra,
    }


def _tiny_model(directory: Path) -> Path:
    """A seeded random Llama (SmolLM2's tokenizer and vocabulary) in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmcompress.io.load import load_model

    smol = load_model("smollm2-135m", dtype="float32", device="cpu")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, max_shard_size="2MB")
    smol.tokenizer.save_pretrained(directory)
    return directory


def _just_over_budget(model_dir: Path) -> str:
    """A host budget one byte below what the model needs in memory (a layer fits easily)."""
    try:
        from slmcompress.streaming.budget import should_stream
    except ImportError:  # moved by a refactor
        from slmcompress.streaming import should_stream
    return str(should_stream(model_dir, "1TB").model_bytes - 1)


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=False)
    cases = {
        "smollm2-gptq-mem": _recipe("mem", "smollm2-135m", [GPTQ_W4], root / "smollm2-gptq-mem"),
        "smollm2-gptq-stream": _recipe(
            "stream",
            "smollm2-135m",
            [{**GPTQ_W4, "streaming": True, "max_memory": "1GiB", "activation_offload": "disk"}],
            root / "smollm2-gptq-stream",
        ),
    }
    tiny = _tiny_model(root / "tiny-model")
    budget = _just_over_budget(tiny)  # both stages stream (the pruned model is smaller)
    print(f"# tiny budget {budget}", file=sys.stderr)
    cases["tiny-prune-stream"] = _recipe(
        "tiny-s", str(tiny), [PRUNE, GPTQ_TINY], root / "tiny-prune-stream", max_memory=budget
    )
    cases["tiny-prune-mem"] = _recipe(
        "tiny-m", str(tiny), [PRUNE, GPTQ_TINY], root / "tiny-prune-mem"
    )
    for case, recipe in cases.items():
        print(f"# running {case}", file=sys.stderr, flush=True)
        _run(root / f"{case}.yaml", recipe)
    print_hashes(root)


def tensor_digest(stage_dir: Path) -> str:
    """sha256 over every tensor of a checkpoint (name, dtype, shape, bytes), whatever the
    sharding or header order: equal for a streamed and an in-memory result of the same math."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    tensors = {}
    for path in sorted(stage_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[name] = handle.get_tensor(name)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def print_hashes(root: Path) -> None:
    """``<case>/<stage>/<file> <sha256>`` per weight file, then ``<case>/<stage> tensors <sha256>``."""
    for path in sorted(root.glob("*/*/*.safetensors")):
        if path.parts[-3] == "tiny-model":
            continue
        print(f"{path.relative_to(root)} {hashlib.sha256(path.read_bytes()).hexdigest()}")
    for stage in sorted({p.parent for p in root.glob("*/*/*.safetensors")}):
        if stage.parts[-2] != "tiny-model":
            print(f"{stage.relative_to(root)} tensors {tensor_digest(stage)}")


if __name__ == "__main__":
    if sys.argv[1] == "--hashes":  # re-hash the outputs of an earlier run
        print_hashes(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
