"""Per-layer resume: a killed run continues from the last finished layer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _stream_utils import random_tokens, small_config, write_sharded_model

from slmcompress.errors import PassError
from slmcompress.streaming.drivers import importance_streaming, score_step
from slmcompress.streaming.engine import StreamOptions

CPU = torch.device("cpu")
OPTIONS = StreamOptions(batch_size=2, max_memory="8GB")


class Crash(Exception):
    pass


def test_restart_continues_from_the_last_finished_layer(tmp_path):
    write_sharded_model(tmp_path / "m", small_config())
    tokens = random_tokens()
    expected = importance_streaming(tmp_path / "m", tokens, CPU, tmp_path / "ref", OPTIONS)

    def crash_at_2(step, heads):
        if step.index == 2:
            raise Crash
        return score_step(step, heads)

    crash_at_2.__qualname__ = "score_step"  # same pass identity as the rerun
    with pytest.raises(Crash):
        importance_streaming(
            tmp_path / "m", tokens, CPU, tmp_path / "w", OPTIONS, scorer=crash_at_2
        )
    seen = []

    def counting(step, heads):
        seen.append(step.index)
        return score_step(step, heads)

    counting.__qualname__ = "score_step"
    got = importance_streaming(
        tmp_path / "m", tokens, CPU, tmp_path / "w", OPTIONS, scorer=counting
    )
    assert seen == [2, 3]
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_sigkill_mid_run_resumes(tmp_path):
    write_sharded_model(tmp_path / "m", small_config())
    script = textwrap.dedent(f"""
        import os, signal, torch
        from slmcompress.streaming.drivers import importance_streaming, score_step
        from slmcompress.streaming.engine import StreamOptions
        def scorer(step, heads):
            if step.index == 3 and os.environ.get("KILL"):
                os.kill(os.getpid(), signal.SIGKILL)
            return score_step(step, heads)
        scorer.__qualname__ = "score_step"
        tokens = torch.randint(0, 1000, (6, 16), generator=torch.Generator().manual_seed(0))
        importance_streaming({str(tmp_path / "m")!r}, tokens, torch.device("cpu"), {str(tmp_path / "w")!r},
                             StreamOptions(batch_size=2, max_memory="8GB"), scorer=scorer)
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


def test_mismatched_config_is_a_one_line_error(tmp_path):
    write_sharded_model(tmp_path / "m", small_config())

    def crash_at_1(step, heads):
        if step.index == 1:
            raise Crash
        return score_step(step, heads)

    crash_at_1.__qualname__ = "score_step"
    with pytest.raises(Crash):
        importance_streaming(
            tmp_path / "m", random_tokens(), CPU, tmp_path / "w", OPTIONS, scorer=crash_at_1
        )
    with pytest.raises(PassError, match=r"different configuration \(differs in: tokens\)") as info:
        importance_streaming(tmp_path / "m", random_tokens(seed=1), CPU, tmp_path / "w", OPTIONS)
    assert "\n" not in str(info.value)
