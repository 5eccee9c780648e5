"""The closed-form re-fit of a pruned layer's consumer: exact cases and its guarantees."""

from __future__ import annotations

import pytest
import torch

from slmcompress.errors import PassError
from slmcompress.prune.reconstruct import InputGram, refit_columns, relative_error, unit_energy


def _data(n: int = 4096, c: int = 12, out: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen)  # (N, C)
    w = torch.randn(out, c, generator=gen)  # (out, C)
    return x, w, x.T @ x / n


def test_a_removed_channel_that_others_explain_is_repaired_exactly():
    x, w, _ = _data()
    x[:, 3] = 0.5 * x[:, 0] - 2.0 * x[:, 7]  # channel 3 is a combination of kept ones
    gram = x.T @ x / x.shape[0]
    keep = torch.tensor([i for i in range(12) if i != 3])
    fitted = refit_columns(w, gram, keep, damp=1e-8)
    assert relative_error(w, w[:, keep], gram, keep) > 1e-2  # deleting loses its share
    assert relative_error(w, fitted, gram, keep) < 1e-9  # the re-fit moves it onto 0 and 7
    torch.testing.assert_close(x[:, keep] @ fitted.T, x @ w.T, rtol=1e-4, atol=1e-4)


def test_the_refit_never_does_worse_than_deleting_on_its_data():
    for seed in range(5):
        x, w, gram = _data(n=64, seed=seed)  # few tokens: the damped fit must still not lose
        keep = torch.randperm(12, generator=torch.Generator().manual_seed(seed))[:7].sort().values
        for damp in (1e-3, 0.3, 10.0):
            fitted = refit_columns(w, gram, keep, damp)
            assert (
                relative_error(w, fitted, gram, keep)
                <= relative_error(w, w[:, keep], gram, keep) + 1e-12
            )


def test_heavy_damping_is_deleting_and_light_damping_is_least_squares():
    x, w, gram = _data()
    keep = torch.tensor([0, 2, 4, 5, 9])
    torch.testing.assert_close(refit_columns(w, gram, keep, 1e9), w[:, keep], rtol=0, atol=1e-6)
    lstsq = torch.linalg.lstsq(x[:, keep].double(), (x @ w.T).double()).solution.T.float()
    torch.testing.assert_close(refit_columns(w, gram, keep, 1e-9), lstsq, rtol=1e-4, atol=1e-4)


def test_refit_keeps_dtype_and_device_of_the_weight_and_refuses_no_damping():
    x, w, gram = _data()
    keep = torch.tensor([1, 2])
    assert refit_columns(w.half(), gram, keep, 0.3).dtype == torch.float16
    with pytest.raises(PassError, match="reconstruct.damp"):
        refit_columns(w, gram, keep, 0.0)


def test_unit_energy_is_the_output_energy_each_unit_adds():
    x, w, gram = _data()
    single = unit_energy(w, gram)
    explicit = torch.stack([(x[:, [j]] @ w[:, [j]].T).pow(2).sum(1).mean() for j in range(12)])
    torch.testing.assert_close(single, explicit, rtol=1e-4, atol=1e-5)
    heads = unit_energy(w, gram, unit=4)  # three "heads" of 4 channels
    explicit = torch.stack(
        [
            (x[:, 4 * h : 4 * h + 4] @ w[:, 4 * h : 4 * h + 4].T).pow(2).sum(1).mean()
            for h in range(3)
        ]
    )
    torch.testing.assert_close(heads, explicit, rtol=1e-4, atol=1e-5)


def test_input_gram_leaves_out_the_first_position_and_averages():
    gram = InputGram(skip_first=1)
    x = torch.randn(2, 5, 3)
    x[:, 0] = 1e6  # an attention-sink-like first token
    gram.add(x[:1])
    gram.add(x[1:])
    rest = x[:, 1:].reshape(-1, 3)
    torch.testing.assert_close(gram.value(), rest.T @ rest / rest.shape[0])
    with pytest.raises(PassError, match="no calibration tokens"):
        InputGram().value()


def test_the_math_runs_on_the_device_of_its_inputs():
    """``meta`` stands in for a GPU: a tensor made on the CPU in between would fail here."""
    x = torch.empty(2, 9, 6, device="meta")
    gram = InputGram()
    gram.add(x)
    g = gram.value()
    w = torch.empty(4, 6, device="meta")
    keep = torch.tensor([0, 3, 4], device="meta")
    assert unit_energy(w, g).device.type == "meta"
    assert unit_energy(w, g, unit=3).device.type == "meta"
    assert refit_columns(w, g, keep, 0.3).shape == (4, 3)
