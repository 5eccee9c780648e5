"""Per-layer resume: a killed run continues from the last finished layer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _stream_utils import (
    assert_same_importance,
    random_tokens,
    small_config,
    streamed_importance,
    write_sharded_model,
)

from slmcompress.errors import PassError
from slmcompress.prune import importance

CPU = torch.device("cpu")


_REAL_SCORER = importance.score_layer


class Crash(Exception):
    pass


def _scorer(monkeypatch, crash_at=None, seen=None):
    """Wrap the per-layer scorer: record layers, or crash at one."""
    real = _REAL_SCORER

    def score(step, *args):
        if step.index == crash_at:
            raise Crash
        if seen is not None:
            seen.append(step.index)
        return real(step, *args)

    monkeypatch.setattr(importance, "score_layer", score)


def test_restart_continues_from_the_last_finished_layer(tmp_path, monkeypatch):
    write_sharded_model(tmp_path / "m", small_config())
    tokens = random_tokens()
    expected = streamed_importance(tmp_path / "m", tokens, tmp_path / "ref")
    _scorer(monkeypatch, crash_at=2)
    with pytest.raises(Crash):
        streamed_importance(tmp_path / "m", tokens, tmp_path / "w")
    seen = []
    _scorer(monkeypatch, seen=seen)
    got = streamed_importance(tmp_path / "m", tokens, tmp_path / "w")
    assert seen == [2, 3]
    assert_same_importance(expected, got)


@pytest.mark.slow
def test_sigkill_mid_run_resumes(tmp_path):
    write_sharded_model(tmp_path / "m", small_config())
    script = textwrap.dedent(f"""
        import os, signal, torch
        from slmcompress.prune import importance
        from slmcompress.streaming.budget import StreamOptions
        from slmcompress.streaming.engine import StreamingRun
        real = importance.score_layer
        def scorer(step, *args):
            if step.index == 3 and os.environ.get("KILL"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(step, *args)
        importance.score_layer = scorer
        tokens = torch.randint(0, 1000, (6, 16), generator=torch.Generator().manual_seed(0))
        options = StreamOptions(batch_size=2, max_memory="8GB", pass_name="importance")
        run = StreamingRun({str(tmp_path / "m")!r}, tokens, torch.device("cpu"), {str(tmp_path / "w")!r}, options)
        importance.activation_importance_of(run)
        print("DONE")
    """)
    killed = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "KILL": "1"}, capture_output=True
    )
    assert killed.returncode == -9
    state = (tmp_path / "w" / "stream" / "state.json").read_text()
    assert '"finished": 3' in state
    resumed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert resumed.returncode == 0 and "DONE" in resumed.stdout, resumed.stderr[-2000:]


def test_mismatched_config_is_a_one_line_error(tmp_path, monkeypatch):
    write_sharded_model(tmp_path / "m", small_config())
    _scorer(monkeypatch, crash_at=1)
    with pytest.raises(Crash):
        streamed_importance(tmp_path / "m", random_tokens(), tmp_path / "w")
    with pytest.raises(PassError, match=r"different configuration \(differs in: tokens\)") as info:
        streamed_importance(tmp_path / "m", random_tokens(seed=1), tmp_path / "w")
    assert "\n" not in str(info.value)
