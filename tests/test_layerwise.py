"""The public layer-step API (hooks, early stops, outputs, the residual shortcut), in memory
and streamed: what GPTQ uses now and prune-with-reconstruction will use."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from slmcompress.arch import LLAMA_LAYOUT, decoder_layers
from slmcompress.errors import PassError
from slmcompress.layerwise import (
    MemoryLoop,
    ResidualBlock,
    StopForward,
    input_of,
    layer_output,
    observe_inputs,
)
from slmcompress.streaming.budget import StreamOptions
from slmcompress.streaming.engine import StreamingRun

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


@pytest.fixture
def model_and_dir(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=1000, num_hidden_layers=3)).eval()
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    return model, tmp_path / "m"


def _tokens():
    return torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))  # (N, T)


def _loops(model_and_dir, tmp_path):
    model, directory = model_and_dir
    streamed = StreamingRun(
        directory, _tokens(), CPU, tmp_path / "s", StreamOptions(batch_size=2, max_memory="8GB")
    )
    return {"memory": MemoryLoop(model, _tokens(), CPU, batch_size=2), "streamed": streamed}


def _reconstruct_like(loop):
    """What a reconstructing prune does per layer: observe down_proj's inputs and the layer's
    outputs in one forward, change down_proj, let the loop re-run the changed layer."""
    seen = []
    for step in loop.steps():
        down = step.layer.mlp.down_proj
        inputs = []
        with observe_inputs(down, lambda x, keep=inputs: keep.append(x.clone())):
            before = [y.clone() for y in step.forward(keep_outputs=True)]
        assert all(
            torch.equal(a, b) for a, b in zip(inputs, step.capture_inputs(down), strict=True)
        )
        down.weight.data.mul_(0.5)
        after = [y.clone() for y in step.outputs()]  # the changed layer, run once
        assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        seen.append((inputs, after))
        loop.commit(step.index)
    return seen


def test_hooks_outputs_and_rerun_are_the_same_in_memory_and_streamed(model_and_dir, tmp_path):
    results = {
        name: _reconstruct_like(loop) for name, loop in _loops(model_and_dir, tmp_path).items()
    }
    for (xm, ym), (xs, ys) in zip(results["memory"], results["streamed"], strict=True):
        assert len(xm) == len(xs) == 2  # one entry per calibration batch
        assert all(torch.equal(a, b) for a, b in zip(xm, xs, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(ym, ys, strict=True))


def test_a_stopping_hook_ends_each_batch_and_cannot_keep_outputs(model_and_dir):
    model, _ = model_and_dir
    step = next(MemoryLoop(model, _tokens(), CPU, batch_size=2).steps())
    reached = []
    with (
        observe_inputs(step.layer.self_attn.q_proj, lambda x: None, stop=True),
        observe_inputs(step.layer.mlp.down_proj, reached.append),
    ):
        assert step.forward() is None
        assert reached == []  # nothing after q_proj ran
        with pytest.raises(PassError, match="a hook stopped a kept forward"):
            step.forward(keep_outputs=True)
    hidden, kwargs = next(step.batches())
    with (  # a stop outside a step's forward is the caller's to catch
        pytest.raises(StopForward),
        observe_inputs(step.layer.mlp.down_proj, lambda x: None, stop=True),
    ):
        step.layer(hidden, **kwargs)


def test_input_groups_and_the_residual_block(model_and_dir):
    model, _ = model_and_dir
    step = next(MemoryLoop(model, _tokens(), CPU, batch_size=2).steps())
    linears = {n: m for n, m in step.layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert step.input_groups(linears) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    assert ResidualBlock.applies(step.layer, LLAMA_LAYOUT)
    block = ResidualBlock(step.layer, LLAMA_LAYOUT)
    assert block.matches(step)
    hidden, kwargs = next(step.batches())
    x_o = block.o_input(hidden, kwargs)
    assert torch.equal(x_o, step.capture_inputs(step.layer.self_attn.o_proj)[0])
    assert torch.equal(
        input_of(step.layer.mlp.down_proj, lambda: step.layer(hidden, **kwargs)),
        step.capture_inputs(step.layer.mlp.down_proj)[0],
    )


def test_the_output_shortcut_holds_for_a_residual_linear_and_refuses_otherwise(model_and_dir):
    model, _ = model_and_dir
    step = next(MemoryLoop(model, _tokens(), CPU, batch_size=2).steps())
    down = step.layer.mlp.down_proj
    with observe_inputs(down, lambda x: None):
        outputs = step.forward(keep_outputs=True)
    inputs = step.capture_inputs(down)
    delta = 0.01 * torch.randn_like(down.weight)  # (out, in)
    down.weight.data.add_(delta)
    assert step.shortcut_outputs(outputs, inputs, delta)
    exact = step.forward(keep_outputs=True)
    for got, want in zip(step.outputs(), exact, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # a change the shortcut does not describe (the o_proj output is not the layer output)
    o_proj = step.layer.self_attn.o_proj
    o_inputs = step.capture_inputs(o_proj)
    o_proj.weight.data.add_(0.1)
    assert not step.shortcut_outputs(exact, o_inputs, torch.full_like(o_proj.weight, 0.1))


def test_produce_outputs_replaces_each_input_as_it_goes(model_and_dir):
    model, _ = model_and_dir
    step = next(MemoryLoop(model, _tokens(), CPU, batch_size=2).steps())
    expected = step.forward(keep_outputs=True)
    kwargs = [kw for _, kw in step.batches()]
    step.produce_outputs(lambda i, h: layer_output(step.layer(h, **kwargs[i])))
    assert all(torch.equal(a, b) for a, b in zip(step.outputs(), expected, strict=True))
    assert all(b.hidden is y for b, y in zip(step.inputs, step.outputs(), strict=True))
    assert len(decoder_layers(model)) == 3
