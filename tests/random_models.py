"""Random models for tests and benchmarks (not part of the library).

- :func:`write_random_checkpoint`: random Llama checkpoints of any size, written shard by
  shard (never whole in memory): a model larger than the memory cap of the process that
  later streams it (the capped-memory test, the scale benchmark).
- :func:`random_quant_linear`: a QuantLinear with random codes, to test kernels against
  :mod:`slmcompress.kernels.reference`.

Benchmarks import it with ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from slmcompress.quant.qparams import n_groups
from slmcompress.quant.quant_linear import QuantLinear
from slmcompress.streaming.sharded_writer import DEFAULT_SHARD_BYTES, sharded_checkpoint


def write_random_checkpoint(
    config: PretrainedConfig,
    target: Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    std: float = 0.02,
) -> int:
    """Write N(0, std) weights (norms = 1) for ``config`` to ``target``; return the weight bytes."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    tied = getattr(config, "tie_word_embeddings", False)
    with sharded_checkpoint(Path(target), max_shard_bytes) as writer:
        for name, param in skeleton.named_parameters(remove_duplicate=False):
            if tied and name == "lm_head.weight":
                continue
            if name.endswith("norm.weight"):
                tensor = torch.ones(param.shape, dtype=dtype)
            else:
                tensor = (torch.randn(param.shape, generator=gen) * std).to(dtype)
            writer.add(name, tensor)
            del tensor
        config.dtype = str(dtype).removeprefix("torch.")
        (writer.directory / "config.json").write_text(config.to_json_string())
    return writer.total_bytes


def act_order_g_idx(in_features: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """``g_idx`` as GPTQ act-order writes it: groups follow a random column permutation."""
    step = in_features if group_size == -1 else group_size
    perm = torch.randperm(in_features, generator=generator)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_features) // step).to(torch.int32)
    return g_idx  # (K,), not monotone


def random_quant_linear(
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    act_order: bool = False,
    seed: int = 0,
    sym: bool = False,
) -> QuantLinear:
    """A QuantLinear with random codes, zeros and positive scales (``group_size`` -1 = per channel).

    ``sym``: every zero point is ``2**(bits-1)``, as symmetric GPTQ writes them.
    """
    gen = torch.Generator().manual_seed(seed)
    groups = n_groups(in_features, group_size)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (groups, out_features), generator=gen, dtype=torch.int32)
    if sym:
        zeros = torch.full_like(zeros, 2 ** (bits - 1))
    scales = torch.rand(groups, out_features, generator=gen) * 0.02 + 0.001  # (G, N)
    if act_order:
        g_idx = act_order_g_idx(in_features, group_size, gen)
    else:
        step = in_features if group_size == -1 else group_size
        g_idx = (torch.arange(in_features) // step).to(torch.int32)
    return QuantLinear.from_codes(codes, scales, zeros, g_idx, bits, group_size)


def random_serving_weight(bits: int, group: int, n: int, k: int, device: str, seed: int = 0):
    """Random codes straight in the kernels' serving layout, made on ``device`` (fast at 8192-class
    sizes, where packing a QuantLinear on the CPU would take minutes). Every bit pattern of the
    words is a valid code; zero points in ``[1, 2**bits)``, scales in ``[0.001, 0.021)``."""
    from slmcompress.kernels.repack import ServingWeight

    gen = torch.Generator(device=device).manual_seed(seed)
    groups = -(-k // group) if group else 1
    words = torch.randint(
        -(2**31), 2**31 - 1, (k * bits // 32, n), generator=gen, device=device, dtype=torch.int32
    )
    scales = (torch.rand(groups, n, generator=gen, device=device) * 0.02 + 1e-3).half()
    zeros = torch.randint(1, 2**bits, (groups, n), generator=gen, device=device).half()
    return ServingWeight(words, scales, zeros, None, bits, k, n, group)


def random_quant_linear_on(
    in_features: int, out_features: int, bits: int, group_size: int, device: str, seed: int = 0
) -> QuantLinear:
    """A QuantLinear whose GPTQ buffers are random bits filled on ``device`` (no CPU packing):
    for speed benchmarks of whole models, where the values do not matter."""
    layer = QuantLinear(in_features, out_features, bits, group_size).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for buf in (layer.qweight, layer.qzeros):
        buf.copy_(torch.randint(-(2**31), 2**31 - 1, buf.shape, generator=gen, device=device))
    layer.scales.copy_(torch.rand(layer.scales.shape, generator=gen, device=device) * 0.02 + 1e-3)
    step = in_features if group_size == -1 else group_size
    layer.g_idx.copy_(torch.arange(in_features, device=device) // step)
    return layer
