"""Serve any slmcompress checkpoint (float or GPTQ): greedy/sampled decoding with a KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.eval.speed import TokenClock


@dataclass(frozen=True)
class Generation:
    """Generated text and decode speed (prefill excluded from tokens/s)."""

    text: str
    new_tokens: int
    tokens_per_s: float
    prefill_s: float
    decode_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    chat: bool = False,
) -> Generation:
    """Generate a continuation; ``chat`` wraps the prompt in the tokenizer's chat template."""
    device = next(model.parameters()).device
    if chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    ids = tokenizer(prompt, return_tensors="pt").to(device)
    sampling = (
        {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    clock = TokenClock()  # timestamps each token as generate emits it (times[0]: the prompt)
    _sync(device)
    start = time.perf_counter()
    out = model.generate(
        **ids, max_new_tokens=max_new_tokens, pad_token_id=pad, streamer=clock, **sampling
    )
    _sync(device)
    new = out[0, ids["input_ids"].shape[1] :]
    first = clock.times[1] if len(clock.times) > 1 else time.perf_counter()
    decode = clock.times[-1] - first  # first -> last new token: len(times) - 2 decode steps
    steps = max(len(clock.times) - 2, 0)
    return Generation(
        tokenizer.decode(new, skip_special_tokens=True),
        new.numel(),
        steps / decode if decode > 0 else 0.0,
        first - start,
        decode,
    )
