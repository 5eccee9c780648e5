"""Bad input, hardening round 3 (issue #23), through the real CLI.

Every case asserts the exit code, exactly one ``error:`` line naming the field or file,
no traceback, no published stage, and that the user's files (including files outside the
output dir reached through a symbolic link) are hash-identical afterwards.

Most cases run in-process through typer's CliRunner; signals, ``kill -9`` and file-size
limits need a real second process (``python -m slmcompress``); those are marked ``slow``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_llama_config, write_recipe
from safetensors.torch import load_file, save_file
from test_bad_input import (
    REPO,
    RTN,
    assert_one_line_error,
    invoke,
    published_stages,
    tree_digest,
)
from transformers import LlamaForCausalLM

from slmcompress.fsutil import LOCK_FILE, is_tmp_name, tmp_name

pytestmark = pytest.mark.usefixtures("single_thread")

GPTQ = [{"type": "quantize", "method": "gptq", "name": "w4", "bits": 4, "group_size": 32}]
EXPORT_F16 = [{"type": "export", "format": "gguf", "name": "gguf", "outtype": "f16"}]
CACHE_ARGS = ["--seq-len", "32", "--n-sequences", "4", "--top-k", "8", "--data", "c4"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def our_temps(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if is_tmp_name(p.name))


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def distill_from(cache: Path, **extra) -> list[dict]:
    stage = {
        "type": "distill",
        "name": "heal",
        "teacher_cache": str(cache),
        "max_steps": 2,
        "seq_len": 32,
        "eval_every": 0,
        "eval_tokens": 64,
        "save_every": 0,
    }
    return [{**stage, **extra}]


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A complete RTN run; copy it before changing it."""
    root = tmp_path_factory.mktemp("run")
    recipe = write_recipe(root / "r.yaml", str(tiny_model_dir), RTN, root / "out")
    with one_thread():
        ok("run", recipe)
    return root / "out"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model_dir) -> Path:
    """A small complete teacher cache (one shard); copy it before changing it."""
    out = tmp_path_factory.mktemp("cache") / "c"
    with one_thread():
        ok("teacher-cache", tiny_model_dir, "--out", out, *CACHE_ARGS)
    return out


@pytest.fixture(scope="module")
def padded_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny teacher whose vocabulary (50,000 logits) is padded past the tokenizer's 49,152."""
    directory = tmp_path_factory.mktemp("padded")
    torch.manual_seed(1)
    LlamaForCausalLM(tiny_llama_config(vocab_size=50_000)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def custom_code_dir(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """A checkpoint whose config names custom code; the code writes a marker if it ever runs."""
    root = tmp_path_factory.mktemp("custom")
    directory = shutil.copytree(tiny_model_dir, root / "custom")
    marker = root / "CODE_RAN"
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="slm_evil_arch", auto_map={"AutoConfig": "evil.EvilConfig"})
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return directory, marker


@contextlib.contextmanager
def one_thread():
    """Module fixtures build what tests compare by sha256 under the tests' thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def copy_run(finished_run: Path, target: Path) -> Path:
    shutil.copytree(finished_run, target, symlinks=True)
    return target


# ================================================================= 1. temp names
def test_output_dir_with_only_user_dotfiles_is_not_empty(tmp_path, tiny_model_dir):
    out = tmp_path / "mine"
    (out / ".photos.tmp-2024").mkdir(parents=True)
    (out / ".photos.tmp-2024" / "beach.jpg").write_bytes(b"\xff\xd8 a photo")
    (out / ".env.old-backup").write_text("API_KEY=secret")
    before = tree_digest(out)
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, out)
    for extra in ([], ["--force"]):
        result = invoke("run", recipe, *extra)
        assert_one_line_error(result.output, result.exit_code, "holds no slmcompress run")
        assert ".env.old-backup" in result.output or ".photos.tmp-2024" in result.output
    assert tree_digest(out) == before
    assert sorted(p.name for p in out.iterdir()) == [".env.old-backup", ".photos.tmp-2024"]


def test_user_dotfiles_inside_a_run_survive_resume_and_force(tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    (out / ".photos.tmp-2024").mkdir()
    (out / ".photos.tmp-2024" / "beach.jpg").write_bytes(b"a photo")
    (out / ".env.old-backup").write_text("API_KEY=secret")
    (out / ".01-w4.tmp-abc123").write_text("the shape of our old temp names; not ours")
    user = [out / ".photos.tmp-2024" / "beach.jpg", out / ".env.old-backup"]
    user.append(out / ".01-w4.tmp-abc123")
    before = {p: sha(p) for p in user}
    recipe = json.loads((out / "run.json").read_text())["recipe_file"]
    for extra in ([], ["--force"]):
        ok("run", recipe, "--output-dir", out, *extra)
        assert {p: sha(p) for p in user} == before


def test_stale_temp_names_need_our_exact_shape_and_a_dead_writer(tmp_path, finished_run):
    """Only ``.slmcompress-tmp.<dead pid>.<8 hex>.<name>`` files or marked dirs are removed."""
    from slmcompress.fsutil import OWNER_FILE

    out = copy_run(finished_run, tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan_file = out / f".slmcompress-tmp.{dead.pid}.0123abcd.run.json"
    orphan_file.write_text("{}")
    orphan_dir = out / f".slmcompress-tmp.{dead.pid}.89abcdef.01-w4"
    orphan_dir.mkdir()
    (orphan_dir / OWNER_FILE).write_text(str(dead.pid))
    kept = {
        "live writer": out / tmp_name("01-w4"),  # our own pid: still in use
        "no marker": out / f".slmcompress-tmp.{dead.pid}.fedcba98.01-w4",
        "wrong shape": out / f".slmcompress-tmp.{dead.pid}.XYZ.01-w4",
        "link": out / f".slmcompress-tmp.{dead.pid}.00000000.summary.md",
    }
    kept["live writer"].write_text("in use")
    kept["no marker"].mkdir()
    (kept["no marker"] / "thesis.tex").write_text("years of work")
    kept["wrong shape"].write_text("x")
    os.symlink(tmp_path, kept["link"])
    recipe = json.loads((out / "run.json").read_text())["recipe_file"]
    ok("run", recipe, "--output-dir", out)
    assert not orphan_file.exists() and not orphan_dir.exists()
    for name, path in kept.items():
        assert path.exists() or path.is_symlink(), name
    assert (kept["no marker"] / "thesis.tex").read_text() == "years of work"


@pytest.mark.slow
def test_kill_9_mid_stage_leaves_orphans_a_rerun_removes(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, out)
    proc = spawn("run", recipe)
    stage_tmp = lambda: [n for n in our_temps(out) if n.endswith(".01-w4")]  # noqa: E731
    freeze_when(proc, lambda: out.is_dir() and bool(stage_tmp()))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert stage_tmp(), "the killed run left its stage temp dir"
    assert published_stages(out) == []
    ok("run", recipe)
    assert our_temps(out) == [] and published_stages(out) == ["01-w4"]
    reference = tmp_path / "ref"
    ok("run", recipe, "--output-dir", reference)
    name = "01-w4/model.safetensors"
    assert sha(out / name) == sha(reference / name)


def test_sensitivity_never_replaces_a_result_the_user_added_files_to(tmp_path, tiny_model_dir):
    out = tmp_path / "sens"
    out.mkdir()
    (out / "sensitivity.json").write_text("{}")  # an earlier result of ours...
    (out / "my-notes.md").write_text("...that the user has since written notes into")
    before = tree_digest(out)
    args = ["--n-samples", "2", "--seq-len", "16", "--eval-tokens", "64", "--eval-seq-len", "32"]
    result = invoke("sensitivity", tiny_model_dir, "--out", out, *args)
    assert_one_line_error(result.output, result.exit_code, "holds 'my-notes.md', which")
    assert tree_digest(out) == before


# ================================================================= 2. symbolic links
def test_a_symlinked_work_dir_is_refused_and_the_scratch_disk_untouched(tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    scratch = tmp_path / "scratch"
    (scratch / "01-w4").mkdir(parents=True)
    (scratch / "01-w4" / "results.csv").write_text("a,b\n1,2\n")
    (scratch / "other-project").mkdir()
    (scratch / "other-project" / "data.bin").write_bytes(os.urandom(64))
    shutil.rmtree(out / ".work", ignore_errors=True)
    (out / ".work").symlink_to(scratch)
    before, stage = tree_digest(scratch), tree_digest(out / "01-w4")
    recipe = json.loads((out / "run.json").read_text())["recipe_file"]
    for extra in ([], ["--force"], ["--from-stage", "1"]):
        result = invoke("run", recipe, "--output-dir", out, *extra)
        assert_one_line_error(
            result.output, result.exit_code, f"{out / '.work'} is a symbolic link"
        )
        assert tree_digest(scratch) == before
    assert tree_digest(out / "01-w4") == stage


@pytest.mark.parametrize("where", ["stage_dir", "inside_work"])
def test_other_symlinked_components_are_refused(tmp_path, finished_run, where):
    out = copy_run(finished_run, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    if where == "stage_dir":  # a finished stage moved to another disk and linked back
        shutil.move(str(out / "01-w4"), str(elsewhere / "01-w4"))
        (out / "01-w4").symlink_to(elsewhere / "01-w4")
        link = out / "01-w4"
    else:  # .work is real, the stage's scratch inside it is a link
        (out / ".work").mkdir(exist_ok=True)
        (out / ".work" / "01-w4").symlink_to(elsewhere)
        link = out / ".work" / "01-w4"
    before = tree_digest(elsewhere)
    recipe = json.loads((out / "run.json").read_text())["recipe_file"]
    result = invoke("run", recipe, "--output-dir", out, "--force")
    assert_one_line_error(result.output, result.exit_code, f"{link} is a symbolic link")
    assert tree_digest(elsewhere) == before


def test_teacher_cache_refuses_a_symlinked_work_dir(tmp_path, tiny_model_dir, cache):
    out = shutil.copytree(cache, tmp_path / "c")
    (out / "manifest.json").unlink()  # an unfinished cache: the builder would use .work
    scratch = tmp_path / "scratch"
    (scratch / "shard-00000").mkdir(parents=True)
    (scratch / "shard-00000" / "notes.txt").write_text("mine")
    (out / ".work").symlink_to(scratch)
    (out / "manifest.partial.json").write_text(
        json.dumps({**json.loads((cache / "manifest.json").read_text()), "shards": []})
    )
    before = tree_digest(scratch)
    result = invoke("teacher-cache", tiny_model_dir, "--out", out, *CACHE_ARGS)
    assert_one_line_error(result.output, result.exit_code, f"{out / '.work'} is a symbolic link")
    assert tree_digest(scratch) == before


# ================================================================= 3. teacher-cache verification
def _tamper_shard(cache_dir: Path, change: Callable[[dict], None], fix_sha: bool) -> Path:
    shard = cache_dir / "shard-00000.safetensors"
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard)
    if fix_sha:  # as if the manifest was rewritten too (or an old, unchecked cache)
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        manifest["shards"][0]["sha256"] = sha(shard)
        (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    return shard


def _distill_run(tmp_path: Path, model: Path, stages: list[dict]) -> tuple[Path, Path]:
    out = tmp_path / "out"
    return write_recipe(tmp_path / "r.yaml", str(model), stages, out), out


def test_distill_refuses_a_corrupted_shard(tmp_path, tiny_model_dir, cache):
    copy = shutil.copytree(cache, tmp_path / "c")

    def alter(tensors: dict) -> None:
        tensors["values"][0, 0, 0] += 1.0
        tensors["indices"][0, 0, 1] = 7

    shard = _tamper_shard(copy, alter, fix_sha=False)
    recipe, out = _distill_run(tmp_path, tiny_model_dir, distill_from(copy))
    result = invoke("run", recipe)
    assert_one_line_error(result.output, result.exit_code, f"shard {shard} is corrupt")
    assert published_stages(out) == []
    assert json.loads((out / "run.json").read_text())["stages"][0]["status"] == "failed"


def test_a_truncated_shard_is_a_read_error_not_a_write_error(tmp_path, tiny_model_dir, cache):
    copy = shutil.copytree(cache, tmp_path / "c")
    shard = copy / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    recipe, out = _distill_run(tmp_path, tiny_model_dir, distill_from(copy))
    result = invoke("run", recipe)
    assert_one_line_error(result.output, result.exit_code, f"shard {shard} is corrupt or truncated")
    assert "cannot write" not in result.output
    assert published_stages(out) == []
    result = invoke("teacher-cache", tiny_model_dir, "--out", copy, *CACHE_ARGS)
    assert_one_line_error(result.output, result.exit_code, f"shard {shard} is corrupt")


def test_a_padded_teacher_vocabulary_is_refused_before_training(
    tmp_path, tiny_model_dir, padded_teacher_dir
):
    """The cache records the teacher's true logit width; a narrower student is refused."""
    padded = tmp_path / "padded-cache"
    ok("teacher-cache", padded_teacher_dir, "--out", padded, *CACHE_ARGS)
    assert json.loads((padded / "manifest.json").read_text())["logits_width"] == 50_000
    recipe, out = _distill_run(tmp_path, tiny_model_dir, distill_from(padded))
    result = invoke("run", recipe)
    assert_one_line_error(
        result.output, result.exit_code, "stages[0].teacher_cache: the teacher's logits are 50000"
    )
    assert published_stages(out) == []


def test_indices_past_the_recorded_vocabulary_are_refused(tmp_path, tiny_model_dir, cache):
    """A cache without logits_width (older format) whose indices reach 49,999."""
    copy = shutil.copytree(cache, tmp_path / "c")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["logits_width"]
    (copy / "manifest.json").write_text(json.dumps(manifest))

    def pad(tensors: dict) -> None:
        tensors["indices"][0, 0, 0] = 49_999

    shard = _tamper_shard(copy, pad, fix_sha=True)
    recipe, out = _distill_run(tmp_path, tiny_model_dir, distill_from(copy))
    result = invoke("run", recipe)
    assert_one_line_error(result.output, result.exit_code, f"shard {shard} holds indices")
    assert "outside [0, 49152)" in result.output
    assert published_stages(out) == []


@pytest.mark.parametrize("key", ["top_k", "shards", "seq_len"])
def test_a_cache_manifest_missing_keys(tmp_path, tiny_model_dir, cache, key):
    copy = shutil.copytree(cache, tmp_path / "c")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest[key]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    recipe, out = _distill_run(tmp_path, tiny_model_dir, distill_from(copy))
    result = invoke("run", recipe)
    assert_one_line_error(result.output, result.exit_code, f"manifest.json: {key}: missing")
    assert not out.exists()  # refused while validating the recipe, before any stage


# ================================================================= 4. a cache killed early
def test_a_cache_with_only_our_orphans_resumes(tmp_path, tiny_model_dir, cache):
    """What a build killed before its first shard leaves: the lock and a temp shard of ours."""
    out = tmp_path / "c"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(f"{dead.pid}\n")
    orphan = out / f".slmcompress-tmp.{dead.pid}.0badf00d.shard-00000.safetensors"
    orphan.write_bytes(b"half a shard")
    ok("teacher-cache", tiny_model_dir, "--out", out, *CACHE_ARGS)
    assert not orphan.exists()
    assert sha(out / "shard-00000.safetensors") == sha(cache / "shard-00000.safetensors")


def test_a_user_work_folder_is_not_taken_for_a_cache(tmp_path, tiny_model_dir):
    out = tmp_path / "mine"
    (out / ".work").mkdir(parents=True)
    (out / ".work" / "notes.txt").write_text("mine")
    before = tree_digest(out)
    result = invoke("teacher-cache", tiny_model_dir, "--out", out, *CACHE_ARGS)
    assert_one_line_error(result.output, result.exit_code, "is not a teacher cache (found '.work')")
    assert tree_digest(out) == before


@pytest.mark.slow
def test_kill_9_before_the_first_shard_resumes(tmp_path, tiny_model_dir):
    out = tmp_path / "c"
    args = ["--seq-len", "64", "--n-sequences", "16", "--top-k", "8", "--data", "c4"]
    proc = spawn("teacher-cache", tiny_model_dir, "--out", out, *args, "--batch-size", "1")
    freeze_when(proc, lambda: (out / "manifest.partial.json").is_file())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "shard-00000.safetensors").exists()
    ok("teacher-cache", tiny_model_dir, "--out", out, *args)
    assert our_temps(out) == []
    reference = tmp_path / "ref"
    ok("teacher-cache", tiny_model_dir, "--out", reference, *args)
    for name in ("shard-00000.safetensors", "manifest.json"):
        assert sha(out / name) == sha(reference / name)


# ================================================================= 5. SIGTERM
def spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "slmcompress", "--quiet", *[str(a) for a in args]]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def freeze_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """Poll until ``ready()``, then SIGSTOP the process so the moment cannot pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the process never reached the point"
        time.sleep(0.003)
    proc.send_signal(signal.SIGSTOP)


def terminate(proc: subprocess.Popen) -> str:
    """SIGTERM a stopped process, let it run its handler; return its stderr."""
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=300)
    return stderr.decode()


def assert_interrupted(proc: subprocess.Popen, stderr: str) -> None:
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGTERM)"), stderr
    assert "Traceback" not in stderr


def _stage_status(out: Path) -> str | None:
    try:
        return json.loads((out / "run.json").read_text())["stages"][0]["status"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_sigterm_during_a_stage_is_recorded_and_resumes_identically(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    data = {"calibration": {"source": "c4", "n_samples": 16, "seq_len": 64}}
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), GPTQ, out)
    spec = yaml.safe_load(recipe.read_text())
    spec["data"].update(data)
    recipe.write_text(yaml.safe_dump(spec))
    proc = spawn("run", recipe)
    freeze_when(proc, lambda: _stage_status(out) == "running")
    assert_interrupted(proc, terminate(proc))
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted" and "SIGTERM" in manifest["error"]
    assert manifest["stages"][0]["status"] == "interrupted"
    assert published_stages(out) == [] and our_temps(out) == []
    ok("run", recipe)
    reference = tmp_path / "ref"
    ok("run", recipe, "--output-dir", reference)
    name = "01-w4/model.safetensors"
    assert sha(out / name) == sha(reference / name)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_sigterm_during_teacher_cache_resumes_identically(tmp_path, tiny_model_dir):
    out = tmp_path / "c"
    args = ["--seq-len", "64", "--n-sequences", "16", "--top-k", "8", "--data", "c4"]
    proc = spawn("teacher-cache", tiny_model_dir, "--out", out, *args, "--batch-size", "1")
    freeze_when(proc, lambda: (out / "manifest.partial.json").is_file())
    assert_interrupted(proc, terminate(proc))
    assert our_temps(out) == [] and not (out / "manifest.json").exists()
    assert not (out / "shard-00000.safetensors").exists()  # interrupted inside the shard
    ok("teacher-cache", tiny_model_dir, "--out", out, *args)
    reference = tmp_path / "ref"
    ok("teacher-cache", tiny_model_dir, "--out", reference, *args)
    for name in ("shard-00000.safetensors", "manifest.json"):
        assert sha(out / name) == sha(reference / name)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_export_interrupted_or_killed_leaves_nothing_a_rerun_does_not_clean(
    tmp_path, finished_run, sig
):
    folder = tmp_path / "deploy"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / ".model.gguf.tmp-2019").write_text("an old file of the user's")
    target = folder / "model.gguf"
    user = tree_digest(folder)
    proc = spawn("export", finished_run / "01-w4", "--out", target)
    freeze_when(proc, lambda: bool(our_temps(folder)))
    if sig == signal.SIGTERM:
        assert_interrupted(proc, terminate(proc))
        assert our_temps(folder) == []
    else:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert our_temps(folder), "kill -9 leaves the temp file of the export"
    assert not target.exists()
    ok("export", finished_run / "01-w4", "--out", target)
    assert our_temps(folder) == []
    reference = tmp_path / "ref.gguf"
    ok("export", finished_run / "01-w4", "--out", reference)
    assert sha(target) == sha(reference)
    assert {k: v for k, v in tree_digest(folder).items() if k != "model.gguf"} == user


# ================================================================= 6. NaN / Inf
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_gptq_scales_is_refused_on_load_and_export(tmp_path, finished_run, value):
    directory = shutil.copytree(finished_run / "01-w4", tmp_path / "ckpt")
    state = load_file(directory / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.scales"
    state[key][0, 3] = value
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    target = tmp_path / "m.gguf"
    for command in (
        ["export", directory, "--out", target],
        ["eval", directory, "--no-speed", "--tasks", ""],
    ):
        result = invoke(*command)
        assert_one_line_error(result.output, result.exit_code, f"tensor {key} holds NaN")
    assert not target.exists() and our_temps(tmp_path) == []


def test_inf_in_a_float_weight_is_refused_on_export(tmp_path, tiny_model_dir):
    directory = shutil.copytree(tiny_model_dir, tmp_path / "ckpt")
    state = load_file(directory / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    state[key][5, 5] = float("-inf")
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    target = tmp_path / "m.gguf"
    result = invoke("export", directory, "--out", target)
    assert_one_line_error(result.output, result.exit_code, f"{key}: holds NaN or infinite")
    assert not target.exists() and our_temps(tmp_path) == []


# ================================================================= 7. bad input called a bug
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["eval", "{model}", "--device", "tpu", "--tasks", ""], "--device: unknown device 'tpu'"),
        (["generate", "{model}", "--device", "npu:0"], "--device: unknown device 'npu:0'"),
        (["teacher-cache", "{model}", "--out", "{tmp}/c", "--device", "tpu"], "--device:"),
        (
            ["teacher-cache", "{model}", "--out", "{tmp}/c", "--top-k", "60000", *CACHE_ARGS[:4]],
            "--top-k: 60000 exceeds the teacher's vocabulary (49152 logits)",
        ),
        (["sensitivity", "{model}", "--n-samples", "0", "--out", "{tmp}/s"], "--n-samples:"),
        (["sensitivity", "{model}", "--eval-tokens", "8", "--out", "{tmp}/s"], "--eval-tokens:"),
        (["generate", "{model}", "--temperature", "1e-45"], "--temperature: 1e-45 is below"),
        (["generate", "{model}", "--prompt", os.fsdecode(b"caf\xe9 \xff")], "--prompt: is not"),
    ],
)
def test_bad_options_are_bad_input_not_bugs(tmp_path, tiny_model_dir, args, expected):
    filled = [a.format(model=tiny_model_dir, tmp=tmp_path) for a in args]
    result = invoke(*filled)
    assert_one_line_error(result.output, result.exit_code, expected)
    assert list(tmp_path.iterdir()) == []  # nothing written for a refused command


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["eval", "generate", "sensitivity"])
def test_cuda_requested_on_a_machine_without_it(tmp_path, tiny_model_dir, command):
    extra = ["--tasks", ""] if command == "eval" else []
    extra += ["--out", str(tmp_path / "s")] if command == "sensitivity" else []
    result = invoke(command, tiny_model_dir, "--device", "cuda", *extra)
    assert_one_line_error(result.output, result.exit_code, "--device: 'cuda' requested, but CUDA")
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, tmp_path / "out")
    result = invoke("run", recipe, "--set", "device=cuda")
    assert_one_line_error(result.output, result.exit_code, "device: 'cuda' requested")
    assert not (tmp_path / "out").exists()


def test_deeply_nested_yaml_and_python_tags(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, tmp_path / "out")
    deep = tmp_path / "deep.yaml"
    deep.write_text(recipe.read_text() + "extra: " + "[" * 5000 + "]" * 5000 + "\n")
    for command in (["recipe", "validate", deep], ["run", deep], ["plan", deep]):
        result = invoke(*command)
        assert_one_line_error(result.output, result.exit_code, "nested deeper than 32 levels")
    marker = tmp_path / "PWNED"
    for value in (
        f"!!python/object/apply:os.system ['touch {marker}']",
        "!!python/name:os.system",
    ):
        result = invoke("run", recipe, "--set", f"seed={value}")
        assert_one_line_error(result.output, result.exit_code, "--set seed: invalid value")
    result = invoke("run", recipe, "--set", "seed=" + "[" * 100 + "]" * 100)
    assert_one_line_error(result.output, result.exit_code, "--set seed: nested deeper")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("report.json", "{broken", "report.json is not valid JSON"),
        ("report.json", '{"metrics": {"wikitext2_ppl": "low"}}', "metrics.wikitext2_ppl is not"),
        ("report.json", "[1, 2]", "report.json is not a stage report"),
        ("slmcompress.json", "{broken", "slmcompress.json is not valid JSON"),
        ("slmcompress.json", '"a string"', "slmcompress.json must hold a JSON object"),
    ],
)
def test_inspect_a_broken_report_or_record(tmp_path, finished_run, name, content, expected):
    directory = shutil.copytree(finished_run / "01-w4", tmp_path / "ckpt")
    (directory / name).write_text(content)
    result = invoke("inspect", directory)
    assert_one_line_error(result.output, result.exit_code, expected)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"model_type": "llama", "hidden_size": 64}', "has no 'num_attention_heads'"),
        (
            '{"hidden_size": "wide", "intermediate_size": 1, "num_hidden_layers": 1, '
            '"num_attention_heads": 1, "vocab_size": 10}',
            "a size is not a number",
        ),
        (None, "is a FIFO, not a regular file"),
    ],
)
def test_a_bad_plan_config(tmp_path, tiny_model_dir, content, expected):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, tmp_path / "out")
    config = tmp_path / "config.json"
    if content is None:
        os.mkfifo(config)
    else:
        config.write_text(content)
    result = invoke("plan", recipe, "--config", config)
    assert_one_line_error(result.output, result.exit_code, expected)
    assert str(config) in result.output


def test_a_broken_report_in_a_run_being_resumed(tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    (out / "01-w4" / "report.json").write_text('{"stage": "w4"}')
    before = tree_digest(out / "01-w4")
    recipe = json.loads((out / "run.json").read_text())["recipe_file"]
    result = invoke("run", recipe, "--output-dir", out)
    assert_one_line_error(
        result.output, result.exit_code, "report.json is not a valid stage report"
    )
    assert tree_digest(out / "01-w4") == before


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "export-stage", "teacher-cache"])
def test_disk_full_is_bad_input_that_says_disk_full(tmp_path, tiny_model_dir, command):
    """``ulimit -f`` stands in for a full disk, as in test_bad_input."""
    folder = tmp_path / "deploy"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    if command == "export":
        args = ["export", tiny_model_dir, "--out", folder / "m.gguf", "--type", "f16"]
        where, limit = f"out: cannot write {folder / 'm.gguf'}: disk full", 4_000_000
    elif command == "export-stage":
        out = folder / "run"
        args = ["run", write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), EXPORT_F16, out)]
        where, limit = "stage 01-gguf: cannot write ", 4_000_000
    else:
        out = folder / "c"
        args = ["teacher-cache", tiny_model_dir, "--out", out, *CACHE_ARGS[:4], "--top-k", "64"]
        where, limit = f"teacher cache: cannot write {out}: disk full", 60_000
    result = cli_limited(args, limit)
    assert_one_line_error(result.stderr, result.returncode, where)
    assert "disk full" in result.stderr
    assert (folder / "notes.txt").read_text() == "mine"
    leftovers = [p for p in folder.rglob("*") if is_tmp_name(p.name) or p.suffix == ".gguf"]
    assert leftovers == []
    if command == "export-stage":
        assert published_stages(folder / "run") == []
        assert json.loads((folder / "run" / "run.json").read_text())["status"] == "failed"


def cli_limited(args: list, limit: int) -> subprocess.CompletedProcess:
    """The CLI under RLIMIT_FSIZE (no .pyc writes, which the limit would also hit)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    command = [sys.executable, "-m", "slmcompress", "--quiet", *[str(a) for a in args]]

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(command, env=env, capture_output=True, text=True, preexec_fn=cap)


# ================================================================= 8. smaller ones
@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_a_recipe_path_that_is_not_a_regular_file(tmp_path, kind):
    path = {"directory": tmp_path, "fifo": tmp_path / "r.yaml", "device": Path("/dev/zero")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    expected = {
        "directory": "is a directory, not a file",
        "fifo": "is a FIFO, not a regular file",
        "device": "is a device or socket, not a regular file",
    }[kind]
    for command in (["recipe", "validate"], ["run"], ["plan"]):
        result = invoke(*command, path)
        assert_one_line_error(result.output, result.exit_code, f"recipe file {path} {expected}")


@pytest.mark.parametrize("command", ["export", "sensitivity", "run"])
def test_remote_code_advice_names_only_an_opt_in_the_command_has(
    tmp_path, custom_code_dir, command
):
    directory, marker = custom_code_dir
    if command == "export":
        result = invoke("export", directory, "--out", tmp_path / "m.gguf")
    elif command == "sensitivity":
        result = invoke("sensitivity", directory, "--out", tmp_path / "s")
    else:
        recipe = write_recipe(tmp_path / "r.yaml", str(directory), RTN, tmp_path / "out")
        result = invoke("run", recipe)
    assert_one_line_error(result.output, result.exit_code, "names custom code (auto_map)")
    assert "--trust-remote-code" not in result.output
    if command == "run":
        assert "recipe key 'trust_remote_code: true'" in result.output
    else:
        assert "this command has no opt-in" in result.output
        assert list(tmp_path.iterdir()) == []
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_stage_teacher_with_remote_code_is_refused_before_stage_one(
    tmp_path, tiny_model_dir, custom_code_dir
):
    directory, marker = custom_code_dir
    stages = RTN + [
        {"type": "distill", "name": "qad", "teacher": str(directory), "max_steps": 1, "seq_len": 32}
    ]
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), stages, out)
    result = invoke("run", recipe)
    assert_one_line_error(result.output, result.exit_code, "stages[1].teacher: ")
    assert "auto_map" in result.output
    assert not out.exists() and not marker.exists()


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("w4\u202eexe.sh", "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ("w4\u200bx", "U+200B"),
        ("w 4", "SPACE"),
    ],
)
def test_stage_names_are_restricted_to_a_safe_set(tmp_path, tiny_model_dir, name, shown):
    stages = [{**RTN[0], "name": name}]
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), stages, out)
    result = invoke("run", recipe)
    assert_one_line_error(
        result.output, result.exit_code, "stages[0].name: may contain only letters, digits and"
    )
    assert shown in result.output and not out.exists()


def test_eval_of_a_gguf_honours_max_memory(tmp_path, tiny_model_dir):
    gguf = tmp_path / "m.gguf"
    ok("export", tiny_model_dir, "--out", gguf, "--type", "f16")
    result = invoke("eval", gguf, "--max-memory", "1B", "--tasks", "", "--no-speed")
    assert_one_line_error(result.output, result.exit_code, "--max-memory: ")
    assert "over the budget" in result.output
