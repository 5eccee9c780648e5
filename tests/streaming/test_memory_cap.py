"""The streaming path runs a model larger than the process's address-space headroom.

A child process imports everything, runs a warm-up, then caps its address space
(RLIMIT_AS) at its current size plus *less than the model's weights*, and streams
importance scoring and GPTQ over the model. Its peak RSS growth must stay well below the
model size: only one layer (plus activations) is ever resident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from _stream_utils import small_config
from random_models import write_random_checkpoint

CHILD = textwrap.dedent("""
    import json, resource, sys, torch, psutil
    from pathlib import Path
    from dataclasses import replace
    from slmcompress.streaming.budget import StreamOptions
    from slmcompress.streaming.engine import StreamingRun
    from slmcompress.prune.importance import activation_importance_of
    from slmcompress.passes.gptq import GPTQConfig, GPTQPass
    model_dir, warm_dir, work, headroom = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    with_gptq = sys.argv[5] == "1"
    tokens = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    options = StreamOptions(batch_size=2, max_memory="1GB")
    cpu = torch.device("cpu")
    class Ctx:
        dtype, device, extra_metrics = torch.float32, cpu, {}
        def __init__(self, work_dir): self.work_dir = work_dir
        def warn(self, message): pass
        def record(self, warnings=(), **metrics): self.extra_metrics.update(metrics)
    cfg = GPTQConfig(type="quantize", method="gptq", bits=4, group_size=64, batch_size=2)
    def both(directory, tag):
        run = StreamingRun(directory, tokens, cpu, work / f"imp-{tag}", replace(options, pass_name="importance"))
        scores = activation_importance_of(run)
        out = None
        if with_gptq:
            ctx = Ctx(work / f"gptq-{tag}")
            gptq_options = replace(options, pass_name="gptq", max_shard_bytes=20_000_000)
            out = GPTQPass(cfg).quantize(StreamingRun(directory, tokens, cpu, ctx.work_dir, gptq_options), ctx).path
        return len(scores.heads), out
    both(warm_dir, "warm")  # lazy imports, thread pools, allocator arenas: before the cap
    proc = psutil.Process()
    base_rss, base_vms = proc.memory_info().rss, proc.memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (base_vms + headroom, base_vms + headroom))
    scores, out = both(model_dir, "big")
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"base_rss": base_rss, "peak_rss": peak, "scores": scores,
                      "shards": len(list(out.glob("*.safetensors"))) if out else None}))
""")


def _run_capped(tmp_path, headroom: int, with_gptq: bool) -> tuple[dict, int]:
    import torch

    config = small_config(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=False,
    )
    weights = write_random_checkpoint(
        config, tmp_path / "m", dtype=torch.float32, max_shard_bytes=50_000_000
    )
    write_random_checkpoint(
        small_config(num_hidden_layers=1), tmp_path / "warm", dtype=torch.float32
    )
    assert headroom < weights  # the process cannot even map the whole model
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    argv = [
        sys.executable,
        "-c",
        CHILD,
        str(tmp_path / "m"),
        str(tmp_path / "warm"),
        str(tmp_path / "w"),
        str(headroom),
        "1" if with_gptq else "0",
    ]
    child = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=580)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1]), weights


@pytest.mark.timeout(300)
def test_importance_streams_under_an_address_space_cap(tmp_path):
    result, weights = _run_capped(tmp_path, 200 * 2**20, with_gptq=False)
    assert result["scores"] > 0
    assert result["peak_rss"] - result["base_rss"] < weights // 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gptq_streams_under_an_address_space_cap(tmp_path):
    result, weights = _run_capped(tmp_path, 250 * 2**20, with_gptq=True)
    assert result["shards"] > 1
    assert result["peak_rss"] - result["base_rss"] < weights
