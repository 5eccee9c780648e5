"""``slmcompress`` command line: thin typer commands over the library API.

Every command turns an :class:`~slmcompress.errors.SlmError` into one line on stderr and
exit code 2, so users and MLOps jobs never see a traceback for bad input.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from slmcompress.errors import SlmError, Terminated, first_line, one_line
from slmcompress.fsutil import io_problem, is_disk_full

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Shrink a large language model into a small deployable one.",
)
recipe_app = typer.Typer(no_args_is_help=True, help="Validate and inspect recipes.")
app.add_typer(recipe_app, name="recipe")

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def cli_errors(func: F) -> F:
    """Report user errors as one line + exit 2, anything unexpected as one line + exit 1.

    An unexpected exception is a bug, not bad input: its traceback goes to the log at debug
    level (``--verbose``) so unattended jobs still get a single ``error:`` line.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_as_interrupt():
                return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except SlmError as exc:
            _print_error(one_line(str(exc)))
            raise typer.Exit(2) from None
        except BrokenPipeError:  # stdout closed early (``| head``): the reader is done, not a bug
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not fail again
            raise typer.Exit(128 + signal.SIGPIPE) from None
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
            name = signal.Signals(signum).name
            err_console.print(
                f"[bold red]interrupted[/] ({name}): completed work is kept; rerun to resume",
                highlight=False,
            )
            raise typer.Exit(128 + signum) from None
        except Exception as exc:  # noqa: BLE001 - last line of defence: never a bare traceback
            logging.getLogger("slmcompress").debug("unexpected error", exc_info=True)
            if is_disk_full(exc):  # a library's own error type for ENOSPC/EFBIG: not a bug
                _print_error(f"cannot write: {io_problem(exc)}")
                raise typer.Exit(2) from None
            _print_error(
                f"unexpected {type(exc).__name__}: {first_line(exc)} "
                "(a bug: rerun with --verbose for the traceback and report it)"
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Terminated`, handled exactly like Ctrl-C.

    Job schedulers (Kubernetes, Slurm) stop a job with SIGTERM; Python's default would
    exit at once, leaving run.json at ``running`` and temp files behind. A second SIGTERM
    during the cleanup gets the default action (exit now; a rerun still resumes).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_error(message: str) -> None:
    # soft_wrap: rich must not break the line at the terminal width
    err_console.print(
        f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True
    )


TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run Python code shipped with the model (auto_map). Off: such models are refused.",
    ),
]


def emit_json(data: Any) -> None:
    """Machine-readable output on stdout (no rich markup)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.callback()
def main_callback(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    """Configure logging once for every command."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "datasets", "lm_eval", "transformers", "filelock", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ------------------------------------------------------------------------ run
@app.command()
@cli_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    output_dir: Annotated[
        Path | None, typer.Option(help="Override the recipe's output_dir.")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Rerun every stage (and replace another recipe's run).")
    ] = False,
    from_stage: Annotated[
        int | None, typer.Option(help="Rerun from this stage number (1-based).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: stages.0.bits=3")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run a recipe: every stage writes a checkpoint and an eval report; reruns resume."""
    from slmcompress.recipe import load_recipe
    from slmcompress.runner import run_recipe

    resolved = load_recipe(recipe, set_ or [])
    result = run_recipe(resolved, output_dir=output_dir, force=force, from_stage=from_stage)
    if as_json:
        emit_json(
            {
                "output_dir": result.output_dir,
                "wall_s": result.wall_s,
                "summary": result.summary_path,
                "stages": [
                    {
                        "name": s.name,
                        "dir": s.directory,
                        "status": s.status,
                        "metrics": (s.report or {}).get("metrics"),
                    }
                    for s in result.stages
                ],
            }
        )
        return
    sys.stdout.write(result.summary_path.read_text() + "\n")
    for stage in result.stages:
        sys.stdout.write(f"  {stage.status:8s} {stage.directory}/  (report.md, report.json)\n")
    sys.stdout.write(f"run finished in {result.wall_s:.0f} s; summary: {result.summary_path}\n")


# ------------------------------------------------------------------------ eval
@app.command("eval")
@cli_errors
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Built-in alias, checkpoint dir, .gguf or hub id.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks ('' for none).")] = "hellaswag",
    limit: Annotated[int, typer.Option(help="Items per task.")] = 200,
    ppl_tokens: Annotated[int, typer.Option(help="WikiText-2 test tokens for perplexity.")] = 8192,
    seq_len: Annotated[int, typer.Option(help="Perplexity window length.")] = 512,
    speed: Annotated[bool, typer.Option(help="Measure generation tokens/s.")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    max_memory: Annotated[
        str | None,
        typer.Option(help="Host budget (e.g. 24GiB); a model above it gets a streamed perplexity."),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Evaluate any model: perplexity, task accuracy, size and speed."""
    from slmcompress.cli.checks import eval_inputs
    from slmcompress.eval.source import evaluate_source
    from slmcompress.io.remote_code import remote_code
    from slmcompress.io.sources import resolve_device

    spec, options = eval_inputs(tasks, limit, ppl_tokens, seq_len, speed)
    resolve_device(device, "--device")
    with remote_code(trust_remote_code, "--trust-remote-code"):
        result = evaluate_source(model, spec, options, device, dtype, max_memory)
    if as_json:
        emit_json(
            {
                "model": model,
                "summary": result.summary,
                "metrics": result.metrics,
                "timings": result.timings,
                "streamed": result.streamed,
                "notes": result.notes,
            }
        )
        return
    table = Table(title=f"eval: {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in {
        **result.metrics,
        "params": result.summary["params"],
        "bytes_on_disk": result.summary["bytes_on_disk"],
    }.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    for note in result.notes:
        err_console.print(f"[dim]{note}[/]")


# ------------------------------------------------------------------------ inspect
@app.command()
@cli_errors
def inspect(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint directory (a stage dir of a run).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Architecture, sizes, parameters, quantization and report summary of a checkpoint."""
    from slmcompress.io.describe import inspect_checkpoint

    info = inspect_checkpoint(checkpoint)
    if as_json:
        emit_json(info)
        return
    table = Table(title=str(checkpoint), show_header=False)
    for key, value in info["summary"].items():
        table.add_row(key, str(value))
    console.print(table)
    if info.get("layers"):
        layers = Table(title="quantized layers")
        for col in ("layer", "bits", "group_size", "backend"):
            layers.add_column(col)
        for row in info["layers"][:12]:
            layers.add_row(row["name"], str(row["bits"]), str(row["group_size"]), row["backend"])
        if len(info["layers"]) > 12:
            layers.add_row(f"... {len(info['layers']) - 12} more", "", "", "")
        console.print(layers)


# ------------------------------------------------------------------------ generate
@app.command()
@cli_errors
def generate(
    model: Annotated[
        str, typer.Argument(help="Checkpoint dir (float or GPTQ), built-in alias, .gguf or hub id.")
    ],
    prompt: Annotated[str, typer.Option(help="Prompt text.")] = "The capital of France is",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat template.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    trust_remote_code: TrustRemoteCode = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Serve a compressed model: generate text with a KV cache and print tokens/s."""
    from slmcompress.cli.checks import check_generate_args, check_prompt_fits
    from slmcompress.generate import generate as run_generate
    from slmcompress.io.load import load_model
    from slmcompress.io.remote_code import remote_code
    from slmcompress.io.sources import resolve_device
    from slmcompress.kernels.dispatch import prepare_for_serving

    check_generate_args(prompt, max_new_tokens, temperature)
    resolve_device(device, "--device")
    with remote_code(trust_remote_code, "--trust-remote-code"):
        loaded = load_model(model, dtype=dtype, device=device)
    check_prompt_fits(loaded.model, loaded.tokenizer, prompt, max_new_tokens, chat)
    backends = prepare_for_serving(loaded.model)
    result = run_generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens, temperature, chat)
    if as_json:
        emit_json({"prompt": prompt, **result.__dict__, "backends": backends})
        return
    sys.stdout.write(prompt + result.text + "\n")
    err_console.print(
        f"[dim]{result.new_tokens} tokens, {result.tokens_per_s:.1f} tokens/s decode, "
        f"prefill {result.prefill_s * 1000:.0f} ms, backends {backends or 'float'}[/]"
    )


# ------------------------------------------------------------------------ export
@app.command()
@cli_errors
def export(
    checkpoint: Annotated[
        str, typer.Argument(help="Checkpoint dir (float or GPTQ), built-in alias or .gguf.")
    ],
    out: Annotated[Path, typer.Option(help="Output file (.gguf).")],
    format_: Annotated[str, typer.Option("--format", help="Export format: gguf.")] = "gguf",
    outtype: Annotated[
        str,
        typer.Option(
            "--type",
            help="auto | f32 | f16 | bf16 | q8_0 | q5_0 | q5_1 | q4_0 | q4_1 (auto: "
            "f16 for float models, the GPTQ codes' own block type for GPTQ g32 checkpoints).",
        ),
    ] = "auto",
    embedding_type: Annotated[
        str | None, typer.Option(help="Type of token_embd/output (default: q8_0 if quantized).")
    ] = None,
    pre_tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer.ggml.pre when it cannot be detected.")
    ] = None,
    requantize: Annotated[
        bool, typer.Option(help="Re-quantize GPTQ layers whose groups cannot map onto blocks.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Export a checkpoint for llama.cpp (GGUF); GPTQ group-32 codes are kept, not re-rounded."""
    from slmcompress.errors import PassError
    from slmcompress.export.gguf_writer import GgufOptions, export_gguf
    from slmcompress.io.load import load_model

    if format_ != "gguf":
        raise PassError(f"--format: unknown export format {format_!r}; supported: gguf")
    if out.exists() and not force:  # before loading any weights
        raise PassError(f"out: {out} exists; pass --force to replace it")
    loaded = load_model(checkpoint, dtype="float32", device="cpu")
    options = GgufOptions(outtype, embedding_type, pre_tokenizer, requantize, force=force)
    result = export_gguf(loaded.model, loaded.tokenizer, out, options)
    for message in result.warnings:
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    if as_json:
        emit_json({"path": result.path, "pre_tokenizer": result.pre_tokenizer, **result.metrics()})
        return
    console.print(
        f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB, {result.outtype}, tensors "
        f"{result.tensor_types}, {result.gptq_transferred} GPTQ layers transferred)"
    )


# ------------------------------------------------------------------------ pruning sensitivity
def _register_sensitivity() -> None:
    from slmcompress.cli.sensitivity import sensitivity_command

    app.command("sensitivity")(cli_errors(sensitivity_command))


_register_sensitivity()


# ------------------------------------------------------------------------ teacher cache
@app.command("teacher-cache")
@cli_errors
def teacher_cache(
    model: Annotated[
        str, typer.Argument(help="Teacher: built-in alias, checkpoint dir, .gguf or hub id.")
    ],
    out: Annotated[Path, typer.Option(help="Cache directory (resumable).")],
    data: Annotated[
        str, typer.Option(help="c4 | wikitext2:validation | file.jsonl | hub/id:split")
    ] = "c4",
    top_k: Annotated[int, typer.Option(help="Teacher logits kept per token.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Sequence length.")] = 512,
    n_sequences: Annotated[
        int | None, typer.Option(help="Sequences to cache (default: all).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Teacher batch size.")] = 4,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    max_memory: Annotated[
        str | None,
        typer.Option(help="Host budget (e.g. 24GiB); a teacher above it is streamed."),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Cache a teacher's top-k logits (sharded safetensors) for distillation without the teacher."""
    from slmcompress.cli.teacher_cache import teacher_cache_command
    from slmcompress.io.remote_code import remote_code

    with remote_code(trust_remote_code, "--trust-remote-code"):
        cache = teacher_cache_command(
            model,
            data,
            top_k,
            out,
            seq_len=seq_len,
            n_sequences=n_sequences,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            max_memory=max_memory,
        )
    console.print(f"teacher cache ready: {out} ({cache!r})")


# ------------------------------------------------------------------------ recipe / models
@recipe_app.command("validate")
@cli_errors
def recipe_validate(
    file: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: stages.0.bits=3")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the resolved recipe as JSON.")
    ] = False,
) -> None:
    """Validate a recipe without loading any weights."""
    from slmcompress.recipe import load_recipe

    resolved = load_recipe(file, set_ or [])
    if as_json:
        emit_json(
            {
                "recipe": resolved.recipe.model_dump(),
                "stages": [
                    {"dir": s.dirname, "config": s.config.model_dump()} for s in resolved.stages
                ],
            }
        )
        return
    console.print(f"[green]ok[/]: {file} ({len(resolved.stages)} stages → {resolved.output_dir})")
    for stage, stage_hash in zip(resolved.stages, resolved.stage_hashes(), strict=True):
        console.print(f"  {stage.dirname:24s} {stage.pass_cls.__name__:16s} {stage_hash}")


@recipe_app.command("passes")
def recipe_passes() -> None:
    """List the registered pass types and their methods."""
    from slmcompress.passes import methods_of, pass_types

    for type_ in pass_types():
        methods = methods_of(type_)
        console.print(f"{type_}" + (f": {', '.join(methods)}" if methods else ""))


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the built-in models (they load with no model hub)."""
    from slmcompress.io.sources import BUILTIN_MODELS

    if as_json:
        emit_json({k: v.description for k, v in BUILTIN_MODELS.items()})
        return
    for alias, entry in BUILTIN_MODELS.items():
        console.print(f"[bold]{alias}[/]: {entry.description}")


# ------------------------------------------------------------------------ plan
@app.command()
@cli_errors
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    device_memory: Annotated[
        str | None, typer.Option(help="GPU memory, e.g. 80GB (omit: this CPU machine).")
    ] = None,
    host_memory: Annotated[str | None, typer.Option(help="Host RAM, e.g. 24GiB.")] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="Published config (llama-3-70b) or config.json instead of the recipe's model."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: stages.0.bits=3")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Predict peak memory, disk and time per stage from the model's config (no weights load)."""
    from slmcompress.plan import plan_recipe, plan_to_dict, render_plan
    from slmcompress.recipe import load_recipe

    # with --config the recipe's model need not be on this machine (planning a 70B run)
    resolved = load_recipe(recipe, set_ or [], check_sources=config is None)
    plans = plan_recipe(resolved, device_memory, host_memory, config)
    if as_json:
        emit_json(plan_to_dict(plans))
        return
    sys.stdout.write(render_plan(plans, title=f"plan: {recipe}"))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
