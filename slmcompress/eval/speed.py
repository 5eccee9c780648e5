"""Generation speed: greedy decode tokens/s with a KV cache, prefill reported separately.

One ``model.generate`` call is timed; a streamer timestamps every token as ``generate`` hands it
over. ``generate`` copies each token to the host (``tokens.cpu()``), which synchronizes CUDA, so
the timestamps split prefill (prompt -> first token) from decode (first -> last token) exactly,
without a second, separately-timed prefill run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from slmcompress.errors import SlmError

log = logging.getLogger(__name__)


class TokenClock(BaseStreamer):
    """Records ``perf_counter()`` each time ``generate`` emits tokens (first: the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _timed_generate(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    new_tokens: int,
    pad_id: int | None,
) -> tuple[torch.Tensor, list[float], float, float]:
    """Greedy-generate exactly ``new_tokens``; returns (output ids, token times, start, end).

    EOS is set to an id the model cannot produce (its vocabulary size), which forces the length
    like ``min_new_tokens`` would, without ``MinNewTokensLengthLogitsProcessor``: that runs
    ``torch.isin`` over the whole vocabulary every step, ~100 ms on a busy CPU (more than a
    SmolLM2-135M forward), and would be timed as if it were decoding.
    """
    device = _model_device(model)
    never = model.config.get_text_config().vocab_size
    clock = TokenClock()
    _sync(device)
    start = time.perf_counter()
    out = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=never,
        pad_token_id=pad_id,
        streamer=clock,
    )
    _sync(device)
    return out, clock.times, start, time.perf_counter()


@torch.no_grad()
def generation_speed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    new_tokens: int = 32,
    prompt: str = "The history of the city",
    batch_size: int = 1,
    warmup: int = 1,
) -> dict[str, Any]:
    """Decode throughput of greedy generation with a KV cache.

    Args:
        model: A causal LM on any device.
        tokenizer: Its tokenizer.
        new_tokens: Tokens generated per sequence (forced: ``min_new_tokens == max_new_tokens``).
        prompt: The prompt, repeated ``batch_size`` times (equal lengths, so no padding).
        batch_size: Sequences decoded together.
        warmup: Untimed generate calls first (kernel selection, allocator, caches).

    Returns:
        ``tokens_per_s`` (decode only: ``batch_size * (new_tokens - 1) / decode_s``, prefill
        excluded), ``prefill_s`` (prompt -> first token), ``decode_s``, ``total_s``,
        ``e2e_tokens_per_s`` (all new tokens over ``total_s``), ``new_tokens`` (generated per
        sequence), ``prompt_tokens``, ``batch_size``, ``device``.
    """
    if new_tokens < 2:
        raise SlmError(f"eval: speed needs new_tokens >= 2 to time decoding, got {new_tokens}")
    device = _model_device(model)
    inputs = tokenizer([prompt] * batch_size, return_tensors="pt").to(device)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    for _ in range(warmup):
        _timed_generate(model, inputs, new_tokens, pad_id)
    out, times, start, end = _timed_generate(model, inputs, new_tokens, pad_id)
    generated = out.shape[1] - inputs["input_ids"].shape[1]
    # times[0]: the prompt is handed over before prefill; times[1]: the first new token.
    prefill_s = times[1] - start
    decode_s = max(times[-1] - times[1], 1e-9)
    result = {
        "tokens_per_s": batch_size * (generated - 1) / decode_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": end - start,
        "e2e_tokens_per_s": batch_size * generated / (end - start),
        "new_tokens": generated,
        "prompt_tokens": inputs["input_ids"].shape[1],
        "batch_size": batch_size,
        "device": str(device),
    }
    log.info(
        "speed: %.1f tokens/s decode (prefill %.3f s, batch %d)",
        result["tokens_per_s"],
        prefill_s,
        batch_size,
    )
    return result
