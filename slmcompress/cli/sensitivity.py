"""``slmcompress sensitivity``: the typer command over :func:`slmcompress.prune.sensitivity.sensitivity`.

Registered on the app by :mod:`slmcompress.cli` when the command is looked up (start-up
stays lazy); ``sensitivity_app`` is the same command on its own app, for tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from slmcompress.errors import SlmError

DEFAULT_AXES = ["mlp"]  # typer needs a list default; never mutated


def parse_ratios(text: str) -> list[float]:
    """``"0.1,0.25,0.5"`` -> ``[0.1, 0.25, 0.5]`` (one-line error naming --ratios)."""
    try:
        ratios = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SlmError(f"--ratios: {text!r} is not a comma-separated list of numbers") from None
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise SlmError(f"--ratios: need fractions between 0 and 1, got {text!r}")
    return ratios


def sensitivity_command(
    model: Annotated[
        str, typer.Argument(help="Model source: built-in alias, HF directory, .gguf or hub id.")
    ],
    axis: Annotated[
        list[str], typer.Option(help="heads | mlp | hidden | layers (repeatable).")
    ] = DEFAULT_AXES,
    ratios: Annotated[
        str, typer.Option(help="Fractions of the axis to remove, comma-separated.")
    ] = "0.1,0.25,0.5",
    per_layer: Annotated[
        bool, typer.Option(help="Also prune one layer at a time (layers: drop each alone).")
    ] = False,
    out: Annotated[
        Path, typer.Option(help="Output directory (an earlier result here is replaced).")
    ] = Path("runs/sensitivity"),
    method: Annotated[str, typer.Option(help="activation | magnitude | random")] = "activation",
    head_pruning: Annotated[str, typer.Option(help="within_groups | kv_groups")] = "within_groups",
    depth_metric: Annotated[str, typer.Option(help="loss | cosine (layers axis)")] = "loss",
    n_samples: Annotated[int, typer.Option(help="Calibration sequences (C4).")] = 16,
    seq_len: Annotated[int, typer.Option(help="Calibration sequence length.")] = 256,
    eval_tokens: Annotated[int, typer.Option(help="WikiText-2 test tokens for perplexity.")] = 4096,
    eval_seq_len: Annotated[int, typer.Option(help="Perplexity window.")] = 512,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    reconstruct: Annotated[
        bool,
        typer.Option(
            help="Re-fit o_proj/down_proj on the kept heads/channels for each axis candidate, "
            "as a prune stage with reconstruct does (per-layer rows stay plain deletions)."
        ),
    ] = False,
    reconstruct_damp: Annotated[
        float, typer.Option(help="Pull of the re-fit towards the parent's weights (0 < d).")
    ] = 0.3,
) -> None:
    """Sweep pruning ratios per axis: CSV, PNG plots and a Markdown summary in --out."""
    from slmcompress.io.load import load_model
    from slmcompress.io.sources import resolve_device
    from slmcompress.prune.sensitivity import sensitivity

    _check_choice("--method", method, ("activation", "magnitude", "random"))
    _check_choice("--head-pruning", head_pruning, ("within_groups", "kv_groups"))
    _check_choice("--depth-metric", depth_metric, ("loss", "cosine"))
    values = parse_ratios(ratios)
    axes = [name.strip() for item in axis for name in item.split(",") if name.strip()]
    calibration, evaluation = data_options(n_samples, seq_len, eval_tokens, eval_seq_len)
    refit = refit_settings(reconstruct, reconstruct_damp)
    resolve_device(device, "--device")
    loaded = load_model(model, device=device)
    result = sensitivity(
        loaded.model,
        loaded.tokenizer,
        axes,
        values,
        out,
        per_layer=per_layer,
        method=method,
        calibration=calibration,
        evaluation=evaluation,
        head_pruning=head_pruning,
        depth_metric=depth_metric,
        reconstruct=refit,
    )
    kind = "re-fit" if refit else "deleted"
    table = Table(title=f"pruning sensitivity, {kind} (baseline ppl {result.baseline_ppl:.2f})")
    for column in ("axis", "ratio", "removed", "size", "non-emb kept", "ppl"):
        table.add_column(column)
    for r in result.rows:
        table.add_row(
            r["axis"],
            f"{r['ratio']:.2f}",
            f"{r['removed']:.1%}",
            str(r["size"]),
            f"{r['non_embedding_ratio']:.1%}",
            f"{r['ppl']:.2f}",
        )
    console = Console()
    console.print(table)
    console.print(f"wrote {result.out_dir}/summary.md")


def data_options(n_samples: int, seq_len: int, eval_tokens: int, eval_seq_len: int):
    """The calibration and evaluation specs; a bad number is one line naming its option."""
    from pydantic import ValidationError

    from slmcompress.data import CalibrationSpec, EvalSpec

    names = {
        ("calibration", "n_samples"): "--n-samples",
        ("calibration", "seq_len"): "--seq-len",
        ("evaluation", "max_tokens"): "--eval-tokens",
        ("evaluation", "seq_len"): "--eval-seq-len",
    }
    specs = []
    for which, cls, fields in (
        ("calibration", CalibrationSpec, {"n_samples": n_samples, "seq_len": seq_len}),
        ("evaluation", EvalSpec, {"max_tokens": eval_tokens, "seq_len": eval_seq_len}),
    ):
        try:
            specs.append(cls(**({"source": "c4"} if which == "calibration" else {}), **fields))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else ""
            option = names.get((which, field), f"--{field.replace('_', '-')}")
            raise SlmError(f"{option}: {err['msg'].removeprefix('Value error, ')}") from None
    if eval_tokens < eval_seq_len:
        raise SlmError(
            f"--eval-tokens: {eval_tokens} is less than one --eval-seq-len window ({eval_seq_len})"
        )
    return specs[0], specs[1]


def refit_settings(reconstruct: bool, damp: float):
    """The re-fit of each candidate, or ``None``; a bad damp is one line naming its option."""
    if not reconstruct:
        return None
    from slmcompress.prune.reconstruction import RefitSettings

    if not damp > 0 or damp != damp or damp == float("inf"):
        raise SlmError(f"--reconstruct-damp: need a positive number, got {damp}")
    return RefitSettings(damp=damp)


def _check_choice(option: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise SlmError(f"{option}: {value!r} is not one of {', '.join(valid)}")


sensitivity_app = typer.Typer(add_completion=False, help="Pruning sensitivity analysis.")
sensitivity_app.command("sensitivity")(sensitivity_command)
