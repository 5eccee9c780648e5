"""Every pass on every supported decoder family (tiny random models from the real config classes).

Per family: the layer-wise engine reproduces the model's own hidden states (Gemma's sliding
and full layers get their own masks/rotary tables); width/depth pruning reloads in plain
transformers and equals masking; a no-op prune is bit-identical; RTN and GPTQ (act-order,
ragged groups, fused linears as one) reload through the project's loader; streamed prune and
GPTQ equal the in-memory ones; distillation and perplexity run on the pruned model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import stream_from
from family_models import FAMILY_NAMES, VOCAB, family_config, family_model
from transformers import AutoModelForCausalLM

from slmcompress.arch import decoder_layers, family_for
from slmcompress.io.checkpoint import load_checkpoint, save_checkpoint
from slmcompress.layerwise import layerwise
from slmcompress.passes.gptq import GPTQConfig, GPTQPass
from slmcompress.passes.prune import PruneConfig, PrunePass
from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass
from slmcompress.prune.importance import random_importance
from slmcompress.prune.planner import KeepPlan, plan_keep, resolve_target, sizes_of
from slmcompress.prune.slicing import head_channels, slice_model
from slmcompress.streaming.sharded_writer import save_state_sharded

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
#: (target, extra prune options) per axis; hidden 48 keeps every family's head shape
AXIS_TARGETS = {
    "mlp": {"ffn_hidden_size": 64},
    "heads": {"num_attention_heads": 2, "num_key_value_heads": 1},
    "hidden": {"hidden_size": 48},
    "depth": {"num_layers": 2},
}


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _prune(model, ctx, target, **options):
    cfg = dict(type="prune", target=target, batch_size=2, depth_metric="cosine", align="none")
    cfg.update(options)
    return PrunePass(PruneConfig(**cfg)).run(model, ctx)


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return request.param


def test_family_is_recognised_and_layerwise_matches_the_model(family):
    model = family_model(family)
    assert family_for(model).name == family
    with torch.no_grad():
        expected = model(TOKENS, output_hidden_states=True).hidden_states
    for step in layerwise(model, TOKENS, torch.device("cpu"), batch_size=2):
        (out,) = step.forward(keep_outputs=True)
        step.set_outputs([out])
        if step.index < len(decoder_layers(model)) - 1:  # the last one is normed by HF
            torch.testing.assert_close(out, expected[step.index + 1], rtol=0, atol=0)


@pytest.mark.parametrize("axis", list(AXIS_TARGETS))
def test_prune_each_axis_reloads_in_plain_transformers(family, axis, make_ctx, tmp_path):
    model = family_model(family)
    pruned = _prune(model, make_ctx(), AXIS_TARGETS[axis])
    assert sizes_of(pruned.config) != sizes_of(model.config)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    logits = _logits(reloaded)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, _logits(pruned))
    if axis == "depth" and getattr(model.config, "layer_types", None):
        kept = pruned.config.slmcompress_source_layers
        assert reloaded.config.layer_types == [model.config.layer_types[i] for i in kept]


def _masked(model, plan):
    """Zero o_proj columns of removed heads and down_proj columns of removed neurons."""
    masked = copy.deepcopy(model)
    head_dim = sizes_of(model.config).head_dim
    for i, layer in enumerate(decoder_layers(masked)):
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        keep = torch.zeros(o.in_features, dtype=torch.bool)
        keep[head_channels(plan.heads[i], head_dim)] = True
        o.weight.data[:, ~keep] = 0
        keep = torch.zeros(down.in_features, dtype=torch.bool)
        keep[plan.neurons[i]] = True
        down.weight.data[:, ~keep] = 0
    return masked


def test_fused_and_biased_width_slicing_equals_masking(family):
    """Heads within their KV groups and neurons: slicing computes exactly what masking does."""
    model = family_model(family)
    current = sizes_of(model.config)
    sizes = resolve_target(current, {"num_attention_heads": 2, "ffn_hidden_size": 40})
    plan = plan_keep(random_importance(model, seed=3), current, sizes)
    pruned = slice_model(model, plan)
    torch.testing.assert_close(_logits(pruned), _logits(_masked(model, plan)), rtol=1e-4, atol=1e-5)


def test_noop_prune_is_bit_identical(family, make_ctx):
    model = family_model(family)
    current = sizes_of(model.config)
    assert _prune(model, make_ctx(), {"ffn_hidden_size": current.ffn_hidden_size}) is model
    layers = list(range(current.num_layers))
    full = KeepPlan(
        sizes=current,
        hidden=torch.arange(current.hidden_size),
        heads={i: torch.arange(current.num_attention_heads) for i in layers},
        kv_heads={i: torch.arange(current.num_key_value_heads) for i in layers},
        neurons={i: torch.arange(current.ffn_hidden_size) for i in layers},
        layers=layers,
    )
    copy_ = slice_model(model, full)
    _assert_same_state(model, copy_)
    assert torch.equal(_logits(copy_), _logits(model))


def test_gemma_hidden_pruning_keeps_the_embedding_values():
    """Gemma scales embeddings by sqrt(hidden): the kept channels start with the same values."""
    model = family_model("gemma3")
    current = sizes_of(model.config)
    sizes = resolve_target(current, {"hidden_size": 48})
    plan = plan_keep(random_importance(model), current, sizes)
    pruned = slice_model(model, plan)
    with torch.no_grad():
        before = model.get_input_embeddings()(TOKENS)[..., plan.hidden]
        after = pruned.get_input_embeddings()(TOKENS)
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_checkpoint_reloads(family, method, make_ctx, tokenizer, tmp_path):
    """4-bit, group 48 (ragged on every 64/128-wide input), act-order for GPTQ."""
    model = family_model(family)
    if method == "rtn":
        quant = RTNPass(RTNConfig(type="quantize", method="rtn", bits=4, group_size=48))
    else:
        quant = GPTQPass(
            GPTQConfig(
                type="quantize", method="gptq", bits=4, group_size=48, act_order=True, batch_size=4
            )
        )
    quantized = quant.run(model, make_ctx())
    save_checkpoint(quantized, tokenizer, tmp_path / "q")
    reloaded, _ = load_checkpoint(tmp_path / "q")
    torch.testing.assert_close(_logits(reloaded), _logits(quantized), rtol=1e-4, atol=1e-4)
    names = {n for n, _ in reloaded.named_modules()}
    fused = family_for(family_model(family)).fused()
    for path in fused:  # a fused linear is one quantized linear in the checkpoint
        assert f"model.layers.0.{path}" in names
        assert type(reloaded.get_submodule(f"model.layers.0.{path}")).__name__ == "QuantLinear"


def _write_dir(model, directory, tokenizer):
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_state_sharded(
        state, directory, 400_000, extra_files={"config.json": model.config.to_json_string()}
    )
    tokenizer.save_pretrained(directory)


def test_streamed_prune_and_gptq_equal_in_memory(family, make_ctx, tokenizer, tmp_path):
    model = family_model(family)
    _write_dir(model, tmp_path / "m", tokenizer)
    target = {"hidden_size": 48, "num_layers": 2, "ffn_hidden_size": 96}
    cfg = PruneConfig(type="prune", target=target, depth_metric="cosine", align="none")
    expected = PrunePass(cfg).run(
        AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval(),
        make_ctx(work_dir=tmp_path / "a"),
    )
    skeleton, residency = stream_from(tmp_path / "m")
    result = PrunePass(cfg).run(skeleton, make_ctx(work_dir=tmp_path / "b", residency=residency))
    streamed = AutoModelForCausalLM.from_pretrained(result.path).eval()
    _assert_same_state(expected, streamed)

    gcfg = dict(type="quantize", method="gptq", bits=4, group_size=32, batch_size=4)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    in_memory = GPTQPass(GPTQConfig(**gcfg)).run(fresh, make_ctx(work_dir=tmp_path / "c"))
    skeleton, residency = stream_from(tmp_path / "m")
    out = GPTQPass(GPTQConfig(**gcfg)).run(
        skeleton, make_ctx(work_dir=tmp_path / "d", residency=residency)
    )
    got, _ = load_checkpoint(out.path)
    _assert_same_state(in_memory, got)


def test_distill_and_perplexity_on_a_pruned_student(family, make_ctx, tokenizer, tmp_path):
    from slmcompress.eval.perplexity import perplexity
    from slmcompress.passes.distill import DistillConfig, DistillPass

    teacher = family_model(family)
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    student = _prune(copy.deepcopy(teacher), make_ctx(), {"ffn_hidden_size": 64})
    cfg = DistillConfig(
        type="distill",
        teacher=str(teacher_dir),
        max_steps=2,
        seq_len=16,
        micro_batch_size=2,
        eval_every=0,
        save_every=0,
    )
    ctx = make_ctx(work_dir=tmp_path / "w")
    (tmp_path / "w").mkdir()
    healed = DistillPass(cfg).run(student, ctx)
    assert ctx.extra_metrics["distill"]["steps"] == 2
    ppl = perplexity(healed, TOKENS.flatten(), seq_len=20).ppl
    assert torch.isfinite(torch.tensor(ppl))


def test_config_classes_are_the_real_ones():
    assert [type(family_config(n)).__name__ for n in FAMILY_NAMES] == [
        "LlamaConfig",
        "MistralConfig",
        "Qwen2Config",
        "Qwen3Config",
        "Gemma3TextConfig",
        "Phi3Config",
    ]


# ---------------------------------------------------------------- bad input
def test_unknown_family_fails_up_front_in_one_line(make_ctx):
    from transformers import GPT2Config, GPT2LMHeadModel

    from slmcompress.errors import PassError

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    with pytest.raises(PassError, match=r"^model: .*model_type 'gpt2' is of no known family") as e:
        _prune(model, make_ctx(), {"ffn_hidden_size": 32})
    assert "\n" not in str(e.value)


def test_head_count_not_dividing_by_kv_heads_names_the_field(make_ctx):
    from slmcompress.errors import PassError

    model = family_model("llama")
    model.config.num_key_value_heads = 3  # 4 heads over 3 KV heads
    with pytest.raises(PassError, match=r"^config\.num_attention_heads: 4 is not a multiple of"):
        _prune(model, make_ctx(), {"ffn_hidden_size": 64})


def test_fused_weight_of_the_wrong_shape_names_the_tensor(make_ctx, tokenizer, tmp_path):
    from slmcompress.errors import PassError, SlmError

    model = family_model("phi3")
    qkv = model.model.layers[1].self_attn.qkv_proj
    qkv.weight = torch.nn.Parameter(qkv.weight.data[:-16])  # one KV head's v rows missing
    with pytest.raises(
        PassError,
        match=r"^model: model\.layers\.1\.self_attn\.qkv_proj\.weight has shape \(112, 64\), "
        r"the config implies \(128, 64\) \(q 64 \+ k 32 \+ v 32 rows\)",
    ):
        _prune(model, make_ctx(), {"ffn_hidden_size": 64})
    _write_dir(model, tmp_path / "m", tokenizer)  # the same checkpoint on disk
    with pytest.raises(SlmError, match=r"qkv_proj\.weight"):
        skeleton, residency = stream_from(tmp_path / "m")
        PrunePass(PruneConfig(type="prune", target={"ffn_hidden_size": 64})).run(
            skeleton, make_ctx(work_dir=tmp_path / "w", residency=residency)
        )
    assert not (tmp_path / "w" / "streamed-checkpoint").exists()


def test_phi3_description_groups_fused_linears():
    from slmcompress.arch import FAMILIES

    phi3 = FAMILIES["phi3"]
    assert phi3.fused() == {
        "self_attn.qkv_proj": ("q", "k", "v"),
        "mlp.gate_up_proj": ("gate", "up"),
    }
    assert phi3.input_groups() == [
        ["self_attn.qkv_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_up_proj"],
        ["mlp.down_proj"],
    ]


def test_unregistered_model_type_with_the_llama_layout_is_derived(make_ctx):
    model = family_model("llama")
    model.config.model_type = "my_llama"  # e.g. a fine-tune's own config class
    assert family_for(model).name == "my_llama (llama layout)"
    pruned = _prune(model, make_ctx(), {"ffn_hidden_size": 64})
    assert pruned.config.intermediate_size == 64


@pytest.mark.parametrize("target", [AXIS_TARGETS["mlp"], AXIS_TARGETS["heads"]])
def test_reconstructed_prune_reloads_and_repairs(family, target, make_ctx, tmp_path):
    """Every family's consumers (o_proj, down_proj; Phi-3's beside fused producers) are
    re-fitted: the layer error falls below deletion's and the checkpoint reloads in plain
    transformers with the same logits."""
    model = family_model(family)
    reconstruct = {"n_samples": 4, "seq_len": 32}
    ctx = make_ctx()
    pruned = _prune(model, ctx, target, reconstruct=reconstruct)
    recon = ctx.extra_metrics["prune"]["reconstruct"]
    key = "down" if "ffn_hidden_size" in target else "o"
    refit, deleted = recon[f"{key}_error_refit"], recon[f"{key}_error_deleted"]
    assert sum(refit) < sum(deleted), (refit, deleted)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(pruned))
    assert set(reloaded.state_dict()) == set(pruned.state_dict())  # no new tensors (biases)
