"""lm-eval task accuracy: offline, and equal to our own log-likelihood scoring of the same items."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from slmcompress.data import data_file
from slmcompress.errors import SlmError
from slmcompress.eval.tasks import available_tasks, render_task_yaml, run_tasks

HELLASWAG = data_file("hellaswag/hellaswag_val_2k.jsonl")


def _items(n: int) -> list[dict]:
    with HELLASWAG.open() as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def test_available_tasks():
    assert available_tasks() == ["hellaswag"]


def test_unknown_task_is_one_line_error_listing_valid_tasks():
    with pytest.raises(SlmError, match="hellaswag") as info:
        run_tasks(None, None, ["hellaswag", "arc_easy"])  # fails before touching the model
    assert "arc_easy" in str(info.value) and "\n" not in str(info.value)


def test_rendered_yaml_points_at_the_shipped_file():
    config = yaml.safe_load(render_task_yaml("hellaswag"))
    path = Path(config["dataset_kwargs"]["data_files"]["validation"])
    assert config["task"] == "hellaswag_slm" and config["dataset_path"] == "json"
    assert path.is_absolute() and path.samefile(HELLASWAG)


def test_shipped_text_is_already_what_lm_eval_preprocessing_yields():
    """Our templates skip lm-eval's ``preprocess``; valid only because it is a no-op on this file."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    for item in _items(2000):
        for text in (item["activity_label"] + ": " + item["ctx"], *item["endings"]):
            assert preprocess(text) == text


def _continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context); tokens split as in the encoded whole string."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    assert whole[: len(context_ids)] == context_ids
    ids = torch.tensor([whole])
    logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)  # (T-1, V)
    targets = ids[0, len(context_ids) :]
    return logprobs[len(context_ids) - 1 :].gather(1, targets[:, None]).sum().item()


def _direct_scores(model, tokenizer, items: list[dict]) -> dict[str, float]:
    """acc / acc_norm (chars, lm-eval's definition) / acc_bytes by argmax over the four endings."""
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for item in items:
        query = f"{item['activity_label']}: {item['ctx']}"
        ll = torch.tensor(
            [_continuation_logprob(model, tokenizer, query, " " + e) for e in item["endings"]]
        )
        chars = torch.tensor([float(len(e)) for e in item["endings"]])
        nbytes = torch.tensor([float(len(e.encode())) for e in item["endings"]])
        for key, scores in (("acc", ll), ("acc_norm", ll / chars), ("acc_bytes", ll / nbytes)):
            hits[key] += int(scores.argmax().item() == item["label"])
    return {key: value / len(items) for key, value in hits.items()}


@pytest.mark.slow
def test_hellaswag_through_lm_eval_equals_direct_scoring(real_model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = real_model.model, real_model.tokenizer
    result = run_tasks(model, tokenizer, ["hellaswag"], limit=20)["hellaswag"]
    assert result["n"] == 20
    for key in ("acc", "acc_norm", "acc_bytes"):
        assert 0.0 <= result[key] <= 1.0
    with torch.no_grad():
        direct = _direct_scores(model, tokenizer, _items(20))
    assert {key: result[key] for key in direct} == pytest.approx(direct, abs=1e-9)
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # restored, not popped


def test_runs_on_quantlinear_model_and_keeps_its_quantization_config(
    tiny_llama, tokenizer, make_ctx
):
    from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass
    from slmcompress.quant.quant_linear import QuantLinear

    model = RTNPass(RTNConfig(type="quantize", name="w4", bits=4, group_size=32)).run(
        tiny_llama, make_ctx()
    )
    assert any(isinstance(module, QuantLinear) for module in model.modules())
    qcfg = model.config.quantization_config
    result = run_tasks(model, tokenizer, ["hellaswag"], limit=3, batch_size=4)["hellaswag"]
    assert result["n"] == 3 and 0.0 <= result["acc_norm"] <= 1.0
    assert model.config.quantization_config == qcfg
