"""Validation of CLI options that have no recipe schema (eval, generate), as one-line errors.

The recipe path validates through pydantic with field paths; these commands take loose
options, so each check names the option the user typed (``--ppl-tokens``), not the
internal field (``max_tokens``).
"""

from __future__ import annotations

import math

from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress.data import EvalOptions, EvalSpec
from slmcompress.errors import SlmError

#: internal field -> the eval command's option
_EVAL_OPTIONS = {
    "tasks": "--tasks",
    "limit": "--limit",
    "max_tokens": "--ppl-tokens",
    "seq_len": "--seq-len",
}


def eval_inputs(tasks: str, limit: int, ppl_tokens: int, seq_len: int, speed: bool):
    """The eval command's options as ``(EvalSpec, EvalOptions)``; errors name the option."""

    try:
        options = EvalOptions(tasks=[t for t in tasks.split(",") if t], limit=limit, speed=speed)
        spec = EvalSpec(max_tokens=ppl_tokens, seq_len=seq_len)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "option"
        message = err["msg"].removeprefix("Value error, ")
        raise SlmError(f"{_EVAL_OPTIONS.get(field, field)}: {message}") from None
    if ppl_tokens < seq_len:
        raise SlmError(f"--ppl-tokens: {ppl_tokens} is less than one --seq-len window ({seq_len})")
    return spec, options


def context_length(model: PreTrainedModel) -> int | None:
    """The model's maximum sequence length, if its config states one."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


#: below this, logits / temperature overflow to inf and sampling fails (use 0 for greedy)
MIN_TEMPERATURE = 1e-3


def check_generate_args(prompt: str, max_new_tokens: int, temperature: float) -> None:
    """Cheap checks before any weight loads."""
    try:
        prompt.encode("utf-8")  # bytes that are not UTF-8 reach us as lone surrogates
    except UnicodeEncodeError:
        raise SlmError("--prompt: is not valid UTF-8 text") from None
    if not prompt.strip():
        raise SlmError("--prompt: must not be empty")
    if max_new_tokens < 1:
        raise SlmError(f"--max-new-tokens: must be at least 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise SlmError(f"--temperature: must be 0 (greedy) or positive, got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise SlmError(
            f"--temperature: {temperature:g} is below {MIN_TEMPERATURE:g}, where sampling "
            "overflows; use 0 for greedy decoding"
        )


def check_prompt_fits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int,
    chat: bool,
) -> None:
    """Prompt plus new tokens must fit the model's context."""
    limit = context_length(model)
    if limit is None:
        return
    n_prompt = len(tokenizer(prompt)["input_ids"]) + (32 if chat else 0)  # template slack
    if n_prompt + max_new_tokens > limit:
        raise SlmError(
            f"--max-new-tokens: the prompt (~{n_prompt} tokens) plus {max_new_tokens} new tokens "
            f"exceeds the model's context of {limit} tokens"
        )
