"""Bad input through the real CLI: one ``error:`` line naming the field or file, exit != 0,
no traceback, no published stage, nothing of the user's touched (issue #12).

Most cases run in-process through typer's CliRunner; the ones that need a second process,
stdin, or a file-size limit run ``python -m slmcompress`` as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from slmcompress.cli import app
from slmcompress.fsutil import LOCK_FILE, TMP_MARKER, exclusive_lock

runner = CliRunner()
RTN = [{"type": "quantize", "method": "rtn", "name": "w4", "bits": 4, "group_size": 32}]
REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return runner.invoke(app, ["--quiet", *[str(a) for a in args]])


def cli_process(*args: str, stdin: str = "", limit_bytes: int | None = None, **kw):
    """``python -m slmcompress ARGS`` in a subprocess (optionally under RLIMIT_FSIZE)."""

    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "slmcompress", "--quiet", *[str(a) for a in args]],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        preexec_fn=limit,
        **kw,
    )


def assert_one_line_error(output: str, code: int, expected: str, want_code: int = 2) -> None:
    """Exactly one non-empty line, ``error: ...`` containing ``expected``; no traceback."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == want_code, output
    assert "Traceback" not in output, output
    assert len(lines) == 1, output
    assert lines[0].startswith("error:"), output
    assert expected in lines[0], output


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (the user's files must not change)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def published_stages(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name[:2].isdigit() and p.name != "00-input")


@pytest.fixture(scope="module")
def rtn_checkpoint(tmp_path_factory, tiny_model_dir) -> Path:
    """A small GPTQ-v1 (RTN) checkpoint written by a real run; copy it before changing it."""
    root = tmp_path_factory.mktemp("rtn")
    recipe = write_recipe(root / "r.yaml", str(tiny_model_dir), RTN, root / "out")
    result = invoke("run", recipe)
    assert result.exit_code == 0, result.output
    return root / "out" / "01-w4"


def copy_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# ----------------------------------------------------------------- --force and user data
def test_force_refuses_a_directory_that_is_not_a_run(tmp_path, tiny_model_dir):
    out = tmp_path / "mine"
    (out / "2024-photos").mkdir(parents=True)
    (out / "2024-photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (out / "notes.txt").write_text("keep me")
    before = tree_digest(out)
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, out)
    for extra in ([], ["--force"]):
        result = invoke("run", recipe, *extra)
        assert_one_line_error(result.output, result.exit_code, "holds no slmcompress run")
    assert tree_digest(out) == before
    assert not (out / "run.json").exists()


def test_force_on_a_run_keeps_what_is_not_ours(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, out)
    assert invoke("run", recipe).exit_code == 0
    (out / "2024-photos").mkdir()
    (out / "2024-photos" / "cat.jpg").write_bytes(b"photo")
    (out / "07-holiday").mkdir()  # looks like a stage dir, is not ours
    (out / "07-holiday" / "a.txt").write_text("x")
    other = write_recipe(
        tmp_path / "other.yaml", str(tiny_model_dir), RTN, out, name="other-recipe"
    )
    result = invoke("run", other, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "2024-photos" / "cat.jpg").read_bytes() == b"photo"
    assert (out / "07-holiday" / "a.txt").read_text() == "x"
    assert json.loads((out / "run.json").read_text())["recipe"]["name"] == "other-recipe"


def test_a_stage_never_replaces_a_foreign_directory_of_its_name(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, out)
    assert invoke("run", recipe).exit_code == 0
    shutil.rmtree(out / "01-w4")
    (out / "01-w4").mkdir()
    (out / "01-w4" / "thesis.tex").write_text("years of work")
    result = invoke("run", recipe, "--force")
    assert_one_line_error(result.output, result.exit_code, "01-w4 was not written by slmcompress")
    assert (out / "01-w4" / "thesis.tex").read_text() == "years of work"


# ----------------------------------------------------------------- remote code
def _remote_code_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    directory = copy_dir(tiny_model_dir, tmp_path / "custom")
    marker = tmp_path / "CODE_RAN"
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type="slm_evil_arch",
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    )
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'slm_evil_arch'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    return directory, marker


def test_checkpoint_code_never_runs_even_when_stdin_says_yes(tmp_path, tiny_model_dir):
    directory, marker = _remote_code_checkpoint(tmp_path, tiny_model_dir)
    result = cli_process("eval", directory, "--tasks", "", "--no-speed", stdin="y\ny\n")
    assert_one_line_error(result.stderr + result.stdout, result.returncode, "auto_map")
    assert "--trust-remote-code" in result.stderr
    recipe = write_recipe(tmp_path / "r.yaml", str(directory), RTN, tmp_path / "out")
    result = cli_process("run", recipe, stdin="y\ny\n")
    assert_one_line_error(result.stderr + result.stdout, result.returncode, "auto_map")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_opting_in_does_run_the_code(tmp_path, tiny_model_dir):
    """The opt-in reaches transformers (so the refusal above is the policy, not an accident)."""
    directory, marker = _remote_code_checkpoint(tmp_path, tiny_model_dir)
    cli_process("eval", directory, "--tasks", "", "--no-speed", "--trust-remote-code")
    assert marker.read_text() == "ran"


# ----------------------------------------------------------------- one writer per directory
def test_second_run_on_a_locked_output_dir_names_the_holder(tmp_path, tiny_model_dir):
    """A real run is frozen (SIGSTOP) while it holds the lock; a second run must refuse."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "slmcompress", "--quiet", "run", str(recipe)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        lock = out / LOCK_FILE
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)
        result = invoke("run", recipe)
        assert_one_line_error(result.output, result.exit_code, f"(pid {first.pid})")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert published_stages(out) == ["01-w4"]


def test_lock_is_recovered_after_its_holder_is_killed(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[2]);"
            "from slmcompress.fsutil import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(600)",
            str(out),
            str(REPO),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, out)
        result = invoke("run", recipe)
        assert_one_line_error(result.output, result.exit_code, f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(out):  # the kernel dropped the dead holder's lock
        pass
    assert invoke("run", recipe).exit_code == 0


def test_teacher_cache_is_locked_too(tmp_path, tiny_model_dir):
    out = tmp_path / "cache"
    out.mkdir()
    with exclusive_lock(out):
        result = cli_process("teacher-cache", tiny_model_dir, "--out", out, "--n-sequences", "1")
    assert_one_line_error(result.stderr, result.returncode, f"(pid {os.getpid()})")


# ----------------------------------------------------------------- output dir
def test_output_dir_is_a_file(tmp_path, tiny_model_dir):
    target = tmp_path / "out"
    target.write_text("not a directory")
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, target)
    result = invoke("run", recipe)
    assert_one_line_error(result.output, result.exit_code, "is a file, not a directory")
    assert target.read_text() == "not a directory"


def test_output_dir_cannot_be_created(tmp_path, tiny_model_dir):
    # root may write anywhere on a normal file system; /proc refuses even root
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, "/proc/self/slm-out")
    result = invoke("run", recipe)
    assert_one_line_error(result.output, result.exit_code, "output_dir: cannot create")


def test_disk_full_while_writing_a_checkpoint(tmp_path, tiny_model_dir):
    """``ulimit -f`` stands in for a full disk: the stage fails whole, run.json says so."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, out)
    result = cli_process("run", recipe, limit_bytes=2_000_000)
    assert_one_line_error(
        result.stderr, result.returncode, "stage 01-w4: cannot write its output: disk full"
    )
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["stages"][0]["status"] == "failed"
    assert published_stages(out) == []
    assert not [p for p in out.iterdir() if TMP_MARKER in p.name]


def test_unexpected_error_marks_the_run_failed(tmp_path, tiny_model_dir, monkeypatch):
    from slmcompress.passes.quantize_rtn import RTNPass

    def broken(self, model, ctx):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(RTNPass, "run", broken)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, out)
    result = invoke("run", recipe)
    assert_one_line_error(result.output, result.exit_code, "unexpected RuntimeError: boom", 1)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages"][0]["status"] == "failed"
    assert published_stages(out) == []


# ----------------------------------------------------------------- recipe fields
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bad\x00name", "stages[0].name: must not contain control characters"),
        ("x" * 300, "stages[0].name: is 300 bytes long; at most 200"),
        ("../escape", "stages[0].name: must not contain '/'"),
    ],
)
def test_bad_stage_names(tmp_path, tiny_model_dir, name, expected):
    stages = [{**RTN[0], "name": name}]
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), stages, tmp_path / "out")
    result = invoke("run", recipe)
    assert_one_line_error(result.output, result.exit_code, expected)
    assert not (tmp_path / "out").exists()


def test_set_into_a_scalar(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, tmp_path / "out")
    result = invoke("run", recipe, "--set", "name.x=1")
    assert_one_line_error(result.output, result.exit_code, "--set name.x: 'name' is a value")


# ----------------------------------------------------------------- data files
def _bad_data_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    binary = bytes(range(256)) * 64
    cases = {
        "binary_txt": (tmp_path / "blob.txt", "is not UTF-8 text"),
        "binary_jsonl": (tmp_path / "blob.jsonl", "is not UTF-8 text"),
        "not_object": (tmp_path / "five.jsonl", "five.jsonl:1 is a JSON int, not an object"),
        "text_not_string": (tmp_path / "num.jsonl", "num.jsonl:1: field 'text' is a int"),
        "directory": (tmp_path / "adir.jsonl", "is a directory"),
    }
    cases["binary_txt"][0].write_bytes(binary)
    cases["binary_jsonl"][0].write_bytes(binary)
    cases["not_object"][0].write_text("5\n")
    cases["text_not_string"][0].write_text('{"text": 123}\n')
    cases["directory"][0].mkdir()
    return cases


@pytest.mark.parametrize(
    "case", ["binary_txt", "binary_jsonl", "not_object", "text_not_string", "directory"]
)
def test_bad_calibration_data_in_a_recipe(tmp_path, tiny_model_dir, case):
    path, expected = _bad_data_files(tmp_path)[case]
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), RTN, tmp_path / "out")
    data = yaml.safe_load(recipe.read_text())
    data["stages"] = [{"type": "quantize", "method": "gptq", "name": "g", "group_size": 32}]
    data["data"]["calibration"]["source"] = str(path)
    recipe.write_text(yaml.safe_dump(data))
    result = invoke("run", recipe)
    assert_one_line_error(result.output, result.exit_code, expected)
    out = tmp_path / "out"
    assert not out.exists() or published_stages(out) == []


@pytest.mark.parametrize(
    "case", ["binary_txt", "binary_jsonl", "not_object", "text_not_string", "directory"]
)
def test_bad_data_for_teacher_cache(tmp_path, tiny_model_dir, case):
    path, expected = _bad_data_files(tmp_path)[case]
    out = tmp_path / "cache"
    result = invoke("teacher-cache", tiny_model_dir, "--out", out, "--data", path)
    assert_one_line_error(result.output, result.exit_code, expected)
    assert not list(out.glob("*.safetensors")) if out.exists() else True


# ----------------------------------------------------------------- eval / generate options
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ppl-tokens", "0"], "--ppl-tokens:"),
        (["--limit", "0"], "--limit:"),
        (["--tasks", "mmlu"], "--tasks: unknown task 'mmlu'; valid: hellaswag"),
        (["--seq-len", "0"], "--seq-len:"),
        (["--seq-len", "4096", "--ppl-tokens", "8192"], "--seq-len: 4096 exceeds the model's"),
    ],
)
def test_bad_eval_options(tiny_model_dir, args, expected):
    result = invoke("eval", tiny_model_dir, "--no-speed", *args)
    assert_one_line_error(result.output, result.exit_code, expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prompt", "  "], "--prompt: must not be empty"),
        (["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
        (["--max-new-tokens", "-5"], "--max-new-tokens: must be at least 1"),
        (["--max-new-tokens", "100000"], "exceeds the model's context of 512 tokens"),
        (["--temperature", "-1"], "--temperature: must be 0 (greedy) or positive"),
    ],
)
def test_bad_generate_options(tiny_model_dir, args, expected):
    result = invoke("generate", tiny_model_dir, *args)
    assert_one_line_error(result.output, result.exit_code, expected)


# ----------------------------------------------------------------- checkpoint contents
def test_gptq_qweight_with_the_wrong_shape(tmp_path, rtn_checkpoint):
    directory = copy_dir(rtn_checkpoint, tmp_path / "ckpt")
    state = load_file(directory / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.qweight"
    state[key] = state[key][:-1].contiguous()
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    for command in (["generate", directory], ["eval", directory, "--no-speed", "--tasks", ""]):
        result = invoke(*command)
        assert_one_line_error(result.output, result.exit_code, f"tensor {key} has shape")


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_gptq_bits_not_a_number(tmp_path, rtn_checkpoint, command):
    directory = copy_dir(rtn_checkpoint, tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["bits"] = "abc"
    (directory / "config.json").write_text(json.dumps(config))
    result = invoke(command, directory)
    assert_one_line_error(
        result.output, result.exit_code, "quantization_config.bits: must be one of 2, 3, 4, 8"
    )


def test_float_tensor_with_the_wrong_shape(tmp_path, tiny_model_dir):
    directory = copy_dir(tiny_model_dir, tmp_path / "ckpt")
    state = load_file(directory / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    state[key] = state[key][:, :-8].contiguous()
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    result = invoke("eval", directory, "--no-speed", "--tasks", "")
    assert_one_line_error(result.output, result.exit_code, f"tensor {key} has shape [64, 120]")
    assert "look at the above" not in result.output


def test_missing_tokenizer_files(tmp_path, tiny_model_dir):
    directory = copy_dir(tiny_model_dir, tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    result = invoke("eval", directory, "--no-speed", "--tasks", "")
    assert_one_line_error(result.output, result.exit_code, "cannot load the tokenizer")
