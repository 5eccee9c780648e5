"""Measure an exported GGUF in llama.cpp itself: perplexity, decode speed, memory to load.

The deployment report of an export stage: the numbers a user gets in the runtime they ship
to, on the same WikiText-2 token windows as every other report. Needs the optional extra
``slmcompress[llamacpp]`` (llama-cpp-python, built from source); without it the export
stage says so in its report instead.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch


def available() -> bool:
    """Whether llama-cpp-python is installed (it is an optional extra)."""
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_nll(path: Path, windows: torch.Tensor, threads: int) -> tuple[float, int]:
    """Summed next-token NLL over windows ``(W, T)`` from llama.cpp's logits, and its count.

    llama.cpp gets our exact token ids, each window scored on its own like our evaluator,
    and the NLL is computed here, so only the runtime's arithmetic differs.
    """
    import llama_cpp

    seq = windows.shape[1]
    llm = llama_cpp.Llama(
        str(path), n_ctx=seq, n_batch=seq, logits_all=True, n_threads=threads, verbose=False
    )
    total, count = 0.0, 0
    try:
        for window in windows:
            llm.reset()
            llm.eval(window.tolist())
            logits = torch.from_numpy(np.array(llm.scores[:seq], dtype=np.float32))  # (T, V)
            logp = torch.log_softmax(logits[:-1].double(), dim=-1)  # (T-1, V)
            total -= float(logp.gather(1, window[1:].view(-1, 1)).sum())
            count += seq - 1
    finally:
        llm.close()
    return total, count


def llama_cpp_decode_speed(path: Path, prompt: list[int], new: int, threads: int) -> float:
    """Greedy batch-1 decode tokens/s (prefill excluded; the better of two runs)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, verbose=False)
    best = 0.0
    try:
        for _ in range(2):  # the first run warms up
            stamps = []
            for _token in llm.generate(prompt, temp=0.0, reset=True):
                stamps.append(time.perf_counter())
                if len(stamps) == new:
                    break
            best = max(best, (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9))
    finally:
        llm.close()
    return best


def load_footprint(path: Path, threads: int) -> tuple[int, float]:
    """RSS growth (bytes) and seconds to load the file into llama.cpp with a small context."""
    import llama_cpp

    process = psutil.Process()
    before, start = process.memory_info().rss, time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, verbose=False, use_mmap=False)
    seconds, grown = time.perf_counter() - start, process.memory_info().rss - before
    llm.close()
    return max(grown, 0), seconds


def measure(
    path: Path, tokens: torch.Tensor, seq_len: int, threads: int = 2, new_tokens: int = 32
) -> dict[str, Any]:
    """The deployment metrics of one GGUF file in llama.cpp (``tokens``: the eval ids ``(N,)``)."""
    windows = tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)  # (W, T)
    # first: a later load would reuse the heap a closed llama.cpp model gave back (RSS +0)
    rss, load_s = load_footprint(path, threads)
    start = time.perf_counter()
    nll, count = llama_cpp_nll(path, windows, threads)
    ppl_s = time.perf_counter() - start
    return {
        "runtime": "llama.cpp (llama-cpp-python)",
        "file_bytes": Path(path).stat().st_size,
        "wikitext2_ppl": math.exp(nll / count),
        "eval_tokens": int(windows.numel()),
        "decode_tokens_per_s": llama_cpp_decode_speed(
            path, tokens[:8].tolist(), new_tokens, threads
        ),
        "load_rss_bytes": rss,
        "load_s": round(load_s, 2),
        "ppl_s": round(ppl_s, 1),
        "threads": threads,
    }
