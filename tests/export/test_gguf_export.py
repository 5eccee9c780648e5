"""Export tiny Llamas to GGUF and read them back with independent readers.

Float exports load through transformers' GGUF loader (its own name map, rope un-permute
and dequantization) and must give our logits; GPTQ-coded exports read back through
``gguf.GGUFReader`` + ``gguf.quants`` must equal each QuantLinear's dequantized weight.
"""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import gguf_fixtures
import numpy as np
import pytest
import torch
from conftest import write_recipe
from transformers import AutoModelForCausalLM

from slmcompress.errors import PassError, RecipeError
from slmcompress.export import llama_cpp_runtime
from slmcompress.export.gguf_blocks import dequantize_payload, quantize_float
from slmcompress.export.gguf_writer import GgufOptions, export_gguf
from slmcompress.passes.base import Context
from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass
from slmcompress.quant.quant_linear import QuantLinear

pytestmark = pytest.mark.usefixtures("single_thread")
# fixtures shared by tests/export (a conftest.py here would shadow the root one)
_bpe_llama = gguf_fixtures._bpe_llama
bpe_llama = gguf_fixtures.bpe_llama
bpe_tokenizer = gguf_fixtures.bpe_tokenizer


def same_weights_reference(model, outtype: str, embedding_type: str):
    """Our model with every matrix replaced by its dequantized GGUF payload."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if param.dim() != 2:
                continue
            type_name = embedding_type if "embed_tokens" in name else outtype
            back = dequantize_payload(quantize_float(param, type_name), type_name)
            param.copy_(torch.from_numpy(back).view_as(param))
    return ref


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # (1, T, V)


@pytest.mark.parametrize(
    ("outtype", "embedding_type", "atol"),
    [("f16", "f16", 2e-3), ("q8_0", "q8_0", 1e-4), ("q4_0", "q8_0", 1e-4), ("q4_1", "f16", 1e-4)],
)
def test_float_export_loads_in_transformers(
    tmp_path, bpe_llama, bpe_tokenizer, outtype, embedding_type, atol
):
    out = tmp_path / f"tiny-{outtype}.gguf"
    options = GgufOptions(outtype=outtype, embedding_type=embedding_type, pre_tokenizer="gpt-2")
    result = export_gguf(bpe_llama, bpe_tokenizer, out, options)
    assert result.tensor_types["f32"] == 5  # 2 x (attn_norm, ffn_norm) + output_norm
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    got = logits(loaded.eval(), ids)
    ours = logits(bpe_llama, ids)
    if outtype != "f16":  # quantized: compare with our own dequantized weights
        ours = logits(same_weights_reference(bpe_llama, outtype, embedding_type), ids)
    assert (got - ours).abs().max() < atol


def gptq_model(model, tokenizer, sym: bool, bits: int = 4, group_size: int = 32):
    ctx = Context(tokenizer, None, torch.device("cpu"), torch.float32, "tiny", None, Path(), Path())
    config = RTNConfig(type="quantize", bits=bits, group_size=group_size, sym=sym)
    return RTNPass(config).run(model, ctx)


def read_tensors(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (np.array(t.data), t.tensor_type.name.lower()) for t in reader.tensors}


def unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' inverse of llama.cpp's q/k permutation."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor()._reverse_permute_weights(rows, n_head, n_head)


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
GGUF_NAMES.update({"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"})


@pytest.mark.parametrize(
    ("sym", "bits", "outtype", "exact"),
    [
        (False, 4, "q4_1", False),
        (True, 4, "q4_0", True),
        (False, 4, "q8_0", True),
        (True, 8, "q8_0", True),
    ],
)
def test_gptq_codes_transfer(tmp_path, bpe_llama, bpe_tokenizer, sym, bits, outtype, exact):
    model = gptq_model(bpe_llama, bpe_tokenizer, sym, bits)
    out = tmp_path / "gptq.gguf"
    result = export_gguf(model, bpe_tokenizer, out, GgufOptions(outtype, pre_tokenizer="gpt-2"))
    assert result.gptq_transferred == 14 and result.tensor_types[outtype] >= 14
    assert (result.transfer_max_abs_err == 0.0) == exact
    tensors = read_tensors(out)
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        block, proj = name.split(".")[2], name.split(".")[-1]
        payload, type_name = tensors[f"blk.{block}.{GGUF_NAMES[proj]}.weight"]
        assert type_name == outtype
        got = dequantize_payload(payload, type_name)  # (out, in)
        if proj in ("q_proj", "k_proj"):
            got = unpermute(got, 4 if proj == "q_proj" else 2)
        expected = layer.dequantize().numpy()
        if exact:
            assert np.array_equal(got, expected), name
        else:  # Q4_1: only m = -scale * zero is rounded to fp16
            bound = float((layer.scales.float() * layer.zeros().float()).abs().max()) * 2**-11
            assert np.abs(got - expected).max() <= bound + 1e-7, name


def test_gptq_group_128_needs_requantize(tmp_path, bpe_llama, bpe_tokenizer):
    model = gptq_model(bpe_llama, bpe_tokenizer, sym=False, group_size=64)
    out = tmp_path / "g64.gguf"
    with pytest.raises(
        PassError, match=r"^model\.layers\.0\.self_attn\.q_proj\.weight: GPTQ group_size 64"
    ):
        export_gguf(model, bpe_tokenizer, out, GgufOptions("q4_1", pre_tokenizer="gpt-2"))
    assert not out.exists() and not list(tmp_path.iterdir())
    result = export_gguf(
        model, bpe_tokenizer, out, GgufOptions("q4_1", pre_tokenizer="gpt-2", requantize=True)
    )
    assert result.gptq_transferred == 0 and len(result.warnings) == 14
    assert "re-quantized with round-to-nearest" in result.warnings[0]


def test_unknown_pretokenizer_is_an_error(tmp_path, bpe_llama, bpe_tokenizer):
    with pytest.raises(PassError, match="^tokenizer: pre-tokenizer not recognised"):
        export_gguf(bpe_llama, bpe_tokenizer, tmp_path / "x.gguf", GgufOptions("f16"))


def test_metadata_llama_cpp_reads(tmp_path, bpe_llama, bpe_tokenizer):
    out = tmp_path / "meta.gguf"
    export_gguf(bpe_llama, bpe_tokenizer, out, GgufOptions("q4_0", pre_tokenizer="gpt-2"))
    fields = gguf.GGUFReader(out).fields
    value = {k: f.contents() for k, f in fields.items() if k != "tokenizer.ggml.merges"}
    assert value["general.architecture"] == "llama"
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert value["llama.attention.head_count"] == 4 and value["llama.attention.head_count_kv"] == 2
    assert value["llama.rope.dimension_count"] == 16 and value["llama.block_count"] == 2
    assert len(value["tokenizer.ggml.tokens"]) == 384
    assert value["tokenizer.ggml.tokens"][383] == "[PAD383]"
    assert value["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL
    assert value["tokenizer.ggml.token_type"][383] == gguf.TokenType.UNUSED
    assert value["tokenizer.ggml.bos_token_id"] == 1 and value["tokenizer.ggml.eos_token_id"] == 2
    assert value["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in value["tokenizer.chat_template"]
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}  # tied


def test_export_stage_in_a_recipe(tmp_path, tiny_model_dir):
    from slmcompress.recipe import load_recipe
    from slmcompress.runner import run_recipe

    stages = [
        {"type": "quantize", "method": "rtn", "name": "w4", "bits": 4, "group_size": 32},
        {"type": "export", "name": "gguf", "format": "gguf"},
    ]
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), stages, tmp_path / "out")
    result = run_recipe(load_recipe(recipe))
    stage_dir = result.stages[1].directory
    assert (stage_dir / "model-auto.gguf").is_file()
    report = result.stages[1].report
    assert report["extra"]["gguf_outtype"] == "q4_1"
    assert report["extra"]["gguf_gptq_transferred"] == 14
    assert not (stage_dir / "model.safetensors").exists()  # the model did not change
    deployment = report["extra"]["deployment"]  # the file in its runtime, or why not
    assert deployment["file_bytes"] == (stage_dir / "model-auto.gguf").stat().st_size
    if llama_cpp_runtime.available():
        ours = report["metrics"]["wikitext2_ppl"]
        assert deployment["wikitext2_ppl"] == pytest.approx(ours, rel=0.05)
        assert "## Deployment" in (stage_dir / "report.md").read_text()
    else:
        assert deployment["skipped"] == "llama-cpp-python is not installed"
        assert "Not measured in its runtime" in (stage_dir / "report.md").read_text()


@pytest.mark.skipif(llama_cpp_runtime.available(), reason="needs llama-cpp-python absent")
def test_runtime_eval_required_without_llama_cpp_is_one_line(tmp_path, tiny_model_dir):
    from slmcompress.errors import SlmError
    from slmcompress.recipe import load_recipe
    from slmcompress.runner import run_recipe

    stages = [{"type": "export", "name": "gguf", "format": "gguf", "runtime_eval": "required"}]
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), stages, tmp_path / "out")
    with pytest.raises(SlmError, match="runtime_eval: required, but llama-cpp-python"):
        run_recipe(load_recipe(recipe))
    assert not (tmp_path / "out" / "01-gguf").exists()


@pytest.mark.parametrize(
    ("quantize", "expected"),
    [
        ({"group_size": 128}, r"stages\[0\] quantizes with group_size 128"),
        (
            {"group_size": 32, "act_order": True},
            r"stages\[0\] uses act_order without static_groups",
        ),
    ],
)
def test_recipe_refuses_unmappable_groups_before_export(
    tmp_path, tiny_model_dir, quantize, expected
):
    from slmcompress.recipe import load_recipe

    stages = [
        {"type": "quantize", "method": "gptq", "name": "w4", "bits": 4, **quantize},
        {"type": "export", "name": "gguf", "outtype": "q4_1"},
    ]
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), stages, tmp_path / "out")
    with pytest.raises(RecipeError, match=r"^stages\[1\]\.outtype: " + expected):
        load_recipe(recipe)
