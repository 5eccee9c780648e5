"""The recipe runner: stages in order, a complete artifact per stage, resumable.

Layout of ``output_dir``::

    run.json            manifest: identity, per-stage status/hash/timings, versions
    summary.md          every stage side by side with the input model
    00-input/           report of the recipe's original model (no checkpoint)
    01-<name>/          checkpoint (HF dir) + slmcompress.json + report.json + report.md
    .work/01-<name>/    pass scratch space that survives a crash (e.g. training checkpoints)

A stage directory only appears (by rename from a temp dir) once its checkpoint *and* report
are written, so "exists with a matching hash" means "complete". Resume = skip those.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmcompress import dist
from slmcompress.errors import RecipeError, SlmError, first_line, one_line
from slmcompress.eval.artifact import EvalBudget, Evaluation, evaluate_artifact, load_for_eval
from slmcompress.eval.report import (
    build_report,
    previous_warnings,
    render_summary_md,
    skipped_for_budget,
    write_report,
)
from slmcompress.fsutil import (
    LOCK_FILE,
    DirectoryBusy,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    clean_stale_tmp,
    exclusive_lock,
    io_problem,
    is_disk_full,
    is_tmp_name,
    read_json_file,
    refuse_links,
    refuse_links_inside,
    safe_rmtree,
)
from slmcompress.io.checkpoint import write_checkpoint_into
from slmcompress.io.files import read_metadata, write_metadata
from slmcompress.io.load import load_model
from slmcompress.io.remote_code import RECIPE_OPT_IN, remote_code
from slmcompress.io.sources import resolve_device, resolve_dtype, resolve_model_dir
from slmcompress.layerwise import WrittenCheckpoint
from slmcompress.passes import streamable_passes
from slmcompress.passes.base import Context, Pass, StageOutput, StreamingOptions
from slmcompress.recipe import ResolvedRecipe, Stage
from slmcompress.streaming.budget import machine_budget, should_stream
from slmcompress.streaming.publish import move_streamed_checkpoint
from slmcompress.streaming.residency import Residency, StageInput
from slmcompress.versions import versions

log = logging.getLogger(__name__)

INPUT_DIR = "00-input"
WORK_DIR = ".work"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so passes are reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class StageOutcome:
    """What happened to one stage in this invocation."""

    name: str
    directory: Path
    status: str  # "ran" | "skipped" | "failed"
    wall_s: float = 0.0
    report: dict[str, Any] | None = None


@dataclass
class RunResult:
    """Outcome of :meth:`Runner.run`."""

    output_dir: Path
    stages: list[StageOutcome] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def summary_path(self) -> Path:
        return self.output_dir / "summary.md"


class Runner:
    """Runs a resolved recipe; see the module docstring for the on-disk contract."""

    def __init__(
        self,
        resolved: ResolvedRecipe,
        output_dir: Path | None = None,
        force: bool = False,
        from_stage: int | None = None,
    ) -> None:
        self.resolved = resolved
        self.recipe = resolved.recipe
        self.out = Path(output_dir) if output_dir else resolved.output_dir
        self.force = force
        self.from_stage = from_stage
        dist.init_from_env()
        self.device = dist.local_device(resolve_device(self.recipe.device))
        self.dtype = resolve_dtype(self.recipe.dtype, self.device)
        self.hashes = resolved.stage_hashes()
        # the host budget that decides streaming: the recipe's, else a fixed share of this
        # machine's RAM (not of the RAM free right now, so reruns take the same path)
        self.budget: str = self.recipe.max_memory or str(machine_budget())
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._model_dir: Path | None = (
            None  # checkpoint the next stage starts from (None = original)
        )

    # ---------------------------------------------------------------- public
    def run(self) -> RunResult:
        """Run (or resume) every stage; raise SlmError on the first failure.

        Rank 0 holds an exclusive lock on ``output_dir`` for the whole run, so a second
        ``slmcompress run`` into the same directory fails at once instead of swapping stage
        directories under the first one. Other ranks never touch the lock.
        """
        if self.from_stage is not None and not 1 <= self.from_stage <= len(self.resolved.stages):
            raise RecipeError(f"--from-stage: must be between 1 and {len(self.resolved.stages)}")
        with remote_code(self.recipe.trust_remote_code, RECIPE_OPT_IN):
            if not dist.is_main():
                return self._run_stages()
            self._make_output_dir()
            self._refuse_foreign(read_run_manifest(self.out))  # before the lock writes its pid
            try:
                with exclusive_lock(self.out):
                    return self._run_stages()
            except DirectoryBusy as exc:
                raise RecipeError(
                    f"output_dir: {self.out} is in use by another slmcompress run (pid "
                    f"{exc.pid}); wait for it to finish or choose another output_dir"
                ) from None
            except (OSError, SafetensorError) as exc:
                raise SlmError(f"output_dir: {self.out}: {io_problem(exc)}") from exc

    def _run_stages(self) -> RunResult:
        start = time.perf_counter()
        manifest: dict[str, Any] = {"stages": [{} for _ in self.resolved.stages]}
        original: dict[str, Any] = {}
        try:
            if dist.is_main():
                self._prepare_output_dir()
                manifest = self._new_manifest()
                original = self._input_report()
            result = RunResult(output_dir=self.out)
            previous = original
            for stage, stage_hash in zip(self.resolved.stages, self.hashes, strict=True):
                outcome = self._run_or_skip(stage, stage_hash, previous, original, manifest)
                result.stages.append(outcome)
                previous = outcome.report["metrics"] if outcome.report else previous
        except BaseException as exc:
            if dist.is_main() and "status" in manifest:
                failed = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                manifest.update(status=failed, error=one_line(first_line(exc)))
                self._write_manifest(manifest)
            raise
        if dist.is_main():
            manifest["status"] = "complete"
            atomic_write_json(self.out / "run.json", manifest)
            self._write_summary()
        dist.barrier()
        result.wall_s = time.perf_counter() - start
        return result

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        """Record a failure in run.json; a full disk must not hide the original error."""
        with contextlib.suppress(OSError):
            atomic_write_json(self.out / "run.json", manifest)

    # ---------------------------------------------------------------- output dir
    def _make_output_dir(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise RecipeError(f"output_dir: {self.out} is a file, not a directory")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecipeError(
                f"output_dir: cannot create {self.out}: {exc.strerror or exc}"
            ) from None

    def _prepare_output_dir(self) -> None:
        """Refuse a directory that is not ours; with ``--force`` remove only what we wrote."""
        old = read_run_manifest(self.out)
        self._refuse_foreign(old)
        if old is not None and old.get("recipe") != self.resolved.identity() and not self.force:
            raise RecipeError(
                f"output_dir: {self.out} holds a run of a different recipe "
                f"({_recipe_name(old)!r}); use --force or another output_dir"
            )
        self._refuse_links()
        clean_stale_tmp(self.out)
        for name in [INPUT_DIR] + [s.dirname for s in self.resolved.stages]:
            if (self.out / name).exists() and not _written_by_us(self.out / name):
                raise RecipeError(
                    f"output_dir: {self.out / name} was not written by slmcompress and a stage "
                    "would replace it; move it away or rename the stage"
                )
        if self.force and old is not None:  # stale resume state must not leak into the new run
            safe_rmtree(self.out / WORK_DIR, self.out)
            listed = {str(s.get("dir")) for s in old.get("stages", []) if isinstance(s, dict)}
            for entry in self.out.iterdir():
                ours = entry.name in listed and entry.name != INPUT_DIR
                if ours and not entry.is_symlink() and entry.is_dir() and _written_by_us(entry):
                    safe_rmtree(entry, self.out)

    def _refuse_links(self) -> None:
        """Every path a run deletes or replaces under must be real, not a symbolic link.

        A ``.work`` linked to a scratch disk would have that disk's files deleted as stale
        resume state; a stage directory linked elsewhere would be swapped for a new one.
        Refusing (one line, before any stage) is simpler to trust than deleting through
        links only what carries our marker.
        """
        names = [WORK_DIR, INPUT_DIR] + [s.dirname for s in self.resolved.stages]
        for name in names:
            refuse_links(self.out, self.out / name, "output_dir: ")
        refuse_links_inside(self.out, self.out / WORK_DIR, "output_dir: ")

    def _refuse_foreign(self, old: dict[str, Any] | None) -> None:
        foreign = sorted(e.name for e in self.out.iterdir() if not _is_scratch(e.name))
        if old is None and foreign:
            raise RecipeError(
                f"output_dir: {self.out} is not empty and holds no slmcompress run (no run.json, "
                f"found {foreign[0]!r}); choose a new or empty directory (--force only "
                "replaces a run of ours)"
            )

    def _new_manifest(self) -> dict[str, Any]:
        manifest = {
            "recipe": self.resolved.identity(),
            "recipe_file": str(self.resolved.source_path) if self.resolved.source_path else None,
            "resolved_recipe": self.recipe.model_dump(),
            "versions": versions(),
            "status": "running",
            "stages": [
                {
                    "index": s.index + 1,
                    "name": s.name,
                    "dir": s.dirname,
                    "hash": h,
                    "status": "pending",
                }
                for s, h in zip(self.resolved.stages, self.hashes, strict=True)
            ],
        }
        atomic_write_json(self.out / "run.json", manifest)
        return manifest

    # ---------------------------------------------------------------- models
    def _ensure_model(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """Load the current model lazily: skipped stages never load weights."""
        if self._model is None:
            if self._model_dir is None:
                loaded = load_model(self.recipe.model, dtype=self.recipe.dtype, device=self.device)
                self._model, self._tokenizer = loaded.model, loaded.tokenizer
            else:
                self._model, self._tokenizer = self._load(self._model_dir)
        return self._model, self._tokenizer

    def _load(self, directory: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """A written checkpoint on the device, as evaluation loads it (the served path on CUDA)."""
        return load_for_eval(directory, self.device, self.dtype)

    def _input_dir(self) -> Path | None:
        """The checkpoint directory the next stage starts from, if it is a local one."""
        return self._model_dir or self._source_dir()

    def _evaluate(
        self, artifact: PreTrainedModel | Path, work_dir: Path, **kwargs: Any
    ) -> Evaluation | None:
        """:func:`~slmcompress.eval.artifact.evaluate_artifact` with the recipe's eval and budget."""
        budget = EvalBudget(self.budget, self.device, self.dtype, work_dir)
        return evaluate_artifact(
            artifact, self.recipe.data.eval, self.recipe.eval, budget, **kwargs
        )

    def _evaluate_current(self, work_dir: Path, stream: bool = True) -> Evaluation | None:
        """Evaluate the model the next stage starts from (kept in memory once loaded)."""
        directory = self._input_dir()
        if self._model is None and directory is not None:  # loaded only if it fits
            return self._evaluate(
                directory, work_dir, load=lambda _dir: self._ensure_model(), stream=stream
            )
        model, tokenizer = self._ensure_model()
        return self._evaluate(model, work_dir, tokenizer=tokenizer)

    def _stage_input(self, stage: Stage) -> StageInput:
        """The model a stage runs on and how it is held: the one residency decision.

        A pass that can stream (``Pass.can_stream``) gets a weightless skeleton when the
        model is over the memory budget or the stage says ``streaming: true``; any other pass
        that reads the weights (``Pass.needs_weights``) refuses a model over the budget up
        front, and one that does not (an eval stage) gets the skeleton to report on.
        """
        cfg = stage.config
        options = cfg if isinstance(cfg, StreamingOptions) else None
        streamable = stage.pass_cls.can_stream(cfg)
        flag = options.streaming if options else None
        stage_budget = options.max_memory if options else None
        if self._model is not None and flag is not True and not (stage_budget and streamable):
            return StageInput(self._model, self._tokenizer)
        directory = self._input_dir()
        if directory is None:
            return StageInput(*self._ensure_model())
        decision = should_stream(directory, stage_budget or self.budget, self.dtype)
        if streamable and flag is not False and (flag or decision.stream):
            log.info("streaming: %s", decision.reason)
            self._model = None
            residency = Residency(
                "streamed",
                directory,
                decision.reason,
                stage_budget or self.recipe.max_memory,
                options.activation_offload,
            )
            return StageInput.on_disk(residency, self.dtype)
        if decision.stream and stage.pass_cls.needs_weights:
            raise SlmError(
                f"stage {stage.dirname}: the model is over the memory budget "
                f"({decision.reason}) and {_pass_name(stage)} cannot stream it; "
                f"only {' and '.join(streamable_passes())} can"
            )
        if decision.stream:
            return StageInput.on_disk(
                Residency("report_only", directory, decision.reason), self.dtype
            )
        return StageInput(*self._ensure_model())

    # ---------------------------------------------------------------- input report
    def _input_report(self) -> dict[str, Any]:
        """Evaluate the recipe's original model once (cached in 00-input/)."""
        directory = self.out / INPUT_DIR
        key = {
            "model": self.recipe.model,
            "dtype": self.recipe.dtype,
            "eval": self.resolved.eval_hash(),
        }
        cached = None
        if (directory / "report.json").is_file() and read_metadata(directory).get(
            "input_key"
        ) == key:
            cached = read_report(directory / "report.json")
            if not skipped_for_budget(cached):
                return cached["metrics"]
        log.info("evaluating the input model %s", self.recipe.model)
        # a cached report skipped for the budget is redone only if the model now fits
        evaluation = self._evaluate_current(self.out / WORK_DIR / INPUT_DIR, cached is None)
        if evaluation is None:
            return cached["metrics"]
        report = build_report(
            "input",
            "input",
            {"model": self.recipe.model},
            evaluation.summary,
            evaluation.metrics,
            None,
            None,
            evaluation.timings,
            evaluation.warnings,
            not_evaluated=evaluation.not_evaluated,
        )
        with atomic_dir(directory) as tmp:
            write_report(tmp, report)
            write_metadata(tmp, {"input_key": key, "versions": versions()})
        return report["metrics"]

    def _source_dir(self) -> Path | None:

        try:
            return resolve_model_dir(self.recipe.model)
        except SlmError:
            return None

    # ---------------------------------------------------------------- stages
    def _is_complete(self, stage: Stage, stage_hash: str) -> bool:
        directory = self.out / stage.dirname
        meta = read_metadata(directory)
        return (directory / "report.json").is_file() and meta.get("stage_hash") == stage_hash

    def _must_rerun(self, stage: Stage) -> bool:
        return self.force or (self.from_stage is not None and stage.index + 1 >= self.from_stage)

    def _run_or_skip(
        self,
        stage: Stage,
        stage_hash: str,
        previous: dict[str, Any],
        original: dict[str, Any],
        manifest: dict[str, Any],
    ) -> StageOutcome:
        entry = manifest["stages"][stage.index]
        directory = self.out / stage.dirname
        dist.barrier()  # every rank sees the same disk state when deciding to skip
        if not dist.is_main():
            return self._follow(stage, stage_hash)
        if not self._must_rerun(stage) and self._is_complete(stage, stage_hash):
            log.info("stage %s is complete (hash %s): skipped", stage.dirname, stage_hash)
            report = read_report(directory / "report.json")
            stale = read_metadata(directory).get("eval_hash") != self.resolved.eval_hash()
            if stale or skipped_for_budget(report):  # a raised max_memory may now allow it
                report = self._reevaluate(stage, directory, previous, original, stale)
            if stage.pass_cls.changes_model:
                self._model = None
                self._model_dir = directory
            entry.update(status="skipped", wall_s=read_metadata(directory).get("wall_s"))
            atomic_write_json(self.out / "run.json", manifest)
            return StageOutcome(stage.name, directory, "skipped", report=report)
        entry.update(status="running", started=time.time())
        atomic_write_json(self.out / "run.json", manifest)
        start = time.perf_counter()
        try:
            report = self._execute(stage, stage_hash, previous, original)
        except BaseException as exc:
            failed = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            entry.update(status=failed, error=one_line(first_line(exc)))
            self._write_manifest(manifest)
            if isinstance(exc, (OSError, SafetensorError)) or (
                isinstance(exc, Exception) and not isinstance(exc, SlmError) and is_disk_full(exc)
            ):  # tokenizers raise a bare Exception for a full disk
                raise SlmError(f"stage {stage.dirname}: {_io_failure(exc)}") from exc
            raise
        wall = time.perf_counter() - start
        entry.update(status="complete", wall_s=wall, finished=time.time())
        atomic_write_json(self.out / "run.json", manifest)
        return StageOutcome(stage.name, directory, "ran", wall, report)

    def _context(self, stage: Stage, stage_input: StageInput, stage_hash: str) -> Context:
        work_dir = self.out / WORK_DIR / stage.dirname
        if dist.is_main():
            claim_work_dir(work_dir, stage_hash, self.out)
        if stage.pass_cls.supports_distributed:  # every rank is here: read only once it is claimed
            dist.barrier()
        work_dir.mkdir(parents=True, exist_ok=True)
        residency = stage_input.residency
        ctx = Context(
            tokenizer=stage_input.tokenizer,
            data=self.recipe.data,
            device=self.device,
            dtype=self.dtype,
            original_model=self.recipe.model,
            teacher=self.recipe.teacher,
            stage_dir=self.out / stage.dirname,
            work_dir=work_dir,
            seed=self.recipe.seed,
            stage_index=stage.index,
            max_memory=self.recipe.max_memory,
            residency=residency,
        )
        if residency.streamed:
            ctx.extra_metrics["streamed_from"] = str(residency.source)
        return ctx

    def _follow(self, stage: Stage, stage_hash: str) -> StageOutcome:
        """Ranks > 0: join distributed passes, otherwise wait for rank 0's checkpoint."""
        directory = self.out / stage.dirname
        skip = not self._must_rerun(stage) and self._is_complete(stage, stage_hash)
        if not skip and stage.pass_cls.supports_distributed:
            stage_input = self._stage_input(stage)  # the same budget check
            seed_everything(self.recipe.seed)
            ctx = self._context(stage, stage_input, stage_hash)
            _make_pass(stage, ctx).run(stage_input.model, ctx)
        if stage.pass_cls.changes_model:
            self._model, self._model_dir = None, directory  # rank 0 writes it before the barrier
        return StageOutcome(stage.name, directory, "skipped" if skip else "followed")

    def _execute(
        self, stage: Stage, stage_hash: str, previous: dict, original: dict
    ) -> dict[str, Any]:
        """Run the pass, write checkpoint + report into a temp dir, evaluate the saved artifact."""
        stage_input = self._stage_input(stage)
        tokenizer = stage_input.tokenizer
        directory = self.out / stage.dirname
        ctx = self._context(stage, stage_input, stage_hash)
        seed_everything(self.recipe.seed)
        log.info("stage %s: %s", stage.dirname, stage.pass_cls.__name__)
        pass_start = time.perf_counter()
        output = _make_pass(stage, ctx).run(stage_input.model, ctx)
        del stage_input
        pass_s = time.perf_counter() - pass_start
        self._model = None  # the input model may have been modified in place
        with atomic_dir(directory) as tmp:
            artifact = self._write_stage(stage, stage_hash, output, tokenizer, ctx, tmp)
            del output
            evaluation = self._evaluate(
                artifact, ctx.work_dir / "eval", tokenizer=tokenizer, load=self._load
            )
            timings = {"pass_s": pass_s, **evaluation.timings}
            report = build_report(
                stage.name,
                _pass_name(stage),
                stage.config.model_dump(),
                evaluation.summary,
                evaluation.metrics,
                previous,
                original,
                timings,
                ctx.warnings + evaluation.warnings,
                ctx.extra_metrics,
                evaluation.not_evaluated,
            )
            write_report(tmp, report)
            self._write_stage_meta(tmp, report, stage_hash, timings)
        if stage.pass_cls.changes_model:
            self._model_dir = directory
        kept = evaluation.model if stage.pass_cls.changes_model else artifact
        in_memory = isinstance(kept, PreTrainedModel)  # then the next stage starts from it
        self._model, self._tokenizer = (kept, tokenizer) if in_memory else (None, None)
        safe_rmtree(ctx.work_dir, self.out, ignore_errors=True)
        return report

    def _write_stage(
        self,
        stage: Stage,
        stage_hash: str,
        output: StageOutput,
        tokenizer: PreTrainedTokenizerBase,
        ctx: Context,
        tmp: Path,
    ) -> PreTrainedModel | Path:
        """Write the checkpoint; return what the report evaluates.

        A changed model is evaluated as written (``tmp``: reloaded, or streamed when over the
        budget), so reports and later stages see exactly the artifact. A stage that changes
        nothing reports on its input: the model in memory, else the input checkpoint.
        """
        for name, path in ctx.artifacts.items():  # e.g. an exported .gguf, a loss curve
            shutil.move(path, tmp / name)  # the work dir is deleted after the stage anyway
        if not stage.pass_cls.changes_model:
            return output if ctx.residency.in_memory else self._input_dir()
        metadata = {
            "stage": stage.name,
            "stage_index": stage.index + 1,
            "pass": _pass_name(stage),
            "stage_hash": stage_hash,
            "recipe": self.resolved.identity(),
            "parent": str(self._model_dir or self.recipe.model),
            "seed": self.recipe.seed,
            "config": stage.config.model_dump(),
        }
        if isinstance(output, WrittenCheckpoint):
            move_streamed_checkpoint(output.path, tmp, metadata, ctx.work_dir)
        else:
            write_checkpoint_into(output.to("cpu"), tokenizer, tmp, metadata)
        return tmp

    def _write_stage_meta(
        self, directory: Path, report: dict, stage_hash: str, timings: dict
    ) -> None:
        meta = read_metadata(directory) or {"stage": report["stage"], "versions": versions()}
        meta.update(
            stage_hash=stage_hash, eval_hash=self.resolved.eval_hash(), wall_s=sum(timings.values())
        )
        write_metadata(directory, meta)

    def _reevaluate(
        self, stage: Stage, directory: Path, previous: dict, original: dict, stale: bool
    ) -> dict[str, Any]:
        """The eval options changed, or a raised budget may now fit the model: re-measure,
        keep the checkpoint. A report skipped for the budget stays while it is still over it."""
        work_dir = self.out / WORK_DIR / stage.dirname / "eval"
        if stage.pass_cls.changes_model:
            evaluation = self._evaluate(directory, work_dir, load=self._load, stream=stale)
        else:
            evaluation = self._evaluate_current(work_dir, stream=stale)
        old = read_report(directory / "report.json")
        if evaluation is None:
            log.warning("stage %s: still over the memory budget; kept its report", stage.dirname)
            return old
        report = build_report(
            stage.name,
            _pass_name(stage),
            old["config"],
            evaluation.summary,
            evaluation.metrics,
            previous,
            original,
            {**old["timings"], **evaluation.timings},
            previous_warnings(old) + evaluation.warnings,
            old.get("extra"),
            evaluation.not_evaluated,
        )
        write_report(directory, report)
        meta = read_metadata(directory)
        meta["eval_hash"] = self.resolved.eval_hash()
        write_metadata(directory, meta, atomic=True)
        return report

    def _write_summary(self) -> None:
        rows = []
        for directory in [self.out / INPUT_DIR] + [
            self.out / s.dirname for s in self.resolved.stages
        ]:
            report_path = directory / "report.json"
            if report_path.is_file():
                rows.append(read_report(report_path))
        atomic_write_text(self.out / "summary.md", render_summary_md(self.recipe.name, rows))


def _make_pass(stage: Stage, ctx: Context) -> Pass:
    """The stage's pass; streamed, with its config adapted (``Pass.for_streaming``, warned)."""
    config = stage.config
    if ctx.residency.streamed:
        config, changes = stage.pass_cls.for_streaming(config)
        for message in changes:
            ctx.warn(message)
    return stage.pass_cls(config)


def _pass_name(stage: Stage) -> str:
    method = stage.pass_cls.pass_method
    return stage.pass_cls.pass_type + (f".{method}" if method else "")


def run_recipe(resolved: ResolvedRecipe, **kwargs: Any) -> RunResult:
    """Convenience wrapper: ``Runner(resolved, **kwargs).run()``."""
    return Runner(resolved, **kwargs).run()


def read_run_manifest(directory: Path) -> dict[str, Any] | None:
    """The ``run.json`` of an output dir, ``None`` if there is none; unreadable is an error."""
    path = Path(directory) / "run.json"
    if not path.exists() and not path.is_symlink():
        return None
    data = read_json_file(path, "output_dir", RecipeError)
    bad = (
        not isinstance(data, dict)
        or not isinstance(data.get("recipe", {}), dict)
        or not isinstance(data.get("stages", []), list)
    )
    if bad:
        raise RecipeError(
            f"output_dir: {path} is not a valid run manifest (an object with a 'recipe' object "
            "and a 'stages' list)"
        )
    return data


#: keys of report.json that resuming and the summary read
_REPORT_KEYS = {"stage": str, "pass": str, "config": dict, "model": dict, "metrics": dict,
                "timings": dict, "warnings": list}  # fmt: skip


def read_report(path: Path) -> dict[str, Any]:
    """A stage's ``report.json`` as written by us; a broken one is one line naming it."""
    report = read_json_file(path, "output_dir", RecipeError)
    for key, kind in _REPORT_KEYS.items():
        if not isinstance(report, dict) or not isinstance(report.get(key), kind):
            raise RecipeError(
                f"output_dir: {path} is not a valid stage report ({key!r} missing or not a "
                f"{kind.__name__}); rerun that stage with --from-stage or --force"
            )
    return report


def _is_scratch(name: str) -> bool:
    """Entries an interrupted run of ours may leave before run.json exists: the lock and our
    temp names (fixed prefix, pid, token), never a user's dotfile such as ``.env.old-backup``."""
    return name == LOCK_FILE or is_tmp_name(name)


def _written_by_us(directory: Path) -> bool:
    """A stage or input directory of ours: its slmcompress.json names a stage or input key."""
    try:
        meta = read_metadata(directory)
    except (ValueError, OSError, SlmError):
        return False
    return isinstance(meta, dict) and ("stage_hash" in meta or "input_key" in meta)


def _io_failure(exc: BaseException) -> str:
    """A full disk is a write failure; anything else may be a read (a truncated input file)."""
    if is_disk_full(exc):
        return f"cannot write its output: {io_problem(exc)}"
    return f"I/O error: {io_problem(exc)}"


def claim_work_dir(work_dir: Path, stage_hash: str, root: Path | None = None) -> Path:
    """The stage's scratch dir, emptied first if a crashed run of *another* stage hash left it.

    Resume state (per-layer results, training checkpoints) is only valid for the exact
    stage and inputs that wrote it; the chained stage hash covers both. ``root`` (the output
    dir) bounds the symlink check: nothing is deleted or resumed through a link (the whole
    scratch tree is checked, since passes delete their own files inside it).
    """
    work_dir = Path(work_dir)
    root = Path(root) if root is not None else work_dir.parent
    refuse_links_inside(root, work_dir, "output_dir: ")
    marker = work_dir / "STAGE_HASH"
    if work_dir.exists() and (not marker.is_file() or marker.read_text() != stage_hash):
        log.info("discarding %s: left by a run of another stage hash", work_dir)
        safe_rmtree(work_dir, root)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic_write_text(marker, stage_hash)
    return work_dir


def _recipe_name(manifest: dict[str, Any]) -> Any:
    recipe = manifest.get("recipe")
    return recipe.get("name") if isinstance(recipe, dict) else None
