"""Peak memory of one forward-KL loss + backward on full teacher logits: fused vs plain autograd.

The distill pass's KD loss over a large vocabulary dominates its memory (Gemma 3: 262,144
logits per token). Each case runs in a fresh process: allocate the student logits (with
grad) and the teacher's, then loss + backward; report the process's peak RSS and the part
of it above the two input tensors. ``plain`` is the unfused expression differentiated by
autograd (what ``forward_kl`` computed before the fused path); ``fused`` is ``forward_kl``.

    python benchmarks/kd_loss_memory.py  ->  benchmarks/results/kd_loss_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from cli_runs import RESULTS, provenance

#: (name, vocabulary): the families whose KD runs this bounds
VOCABS = [("SmolLM2", 49152), ("Llama 3", 128256), ("Gemma 3", 262144)]
BATCH, SEQ = 4, 256  # the Gemma quickstart's micro-batch


def _plain(student, teacher, temperature: float = 1.0):
    import torch.nn.functional as F

    log_q = F.log_softmax(student.float() / temperature, -1)
    log_p = F.log_softmax(teacher.float() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


def child(variant: str, vocab: int) -> None:
    """One measurement, printed as JSON (run in its own process so ru_maxrss is its own)."""
    import torch

    from slmcompress.distill.losses import forward_kl

    torch.manual_seed(0)
    student = torch.randn(BATCH, SEQ, vocab).requires_grad_(True)
    teacher = torch.randn(BATCH, SEQ, vocab)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = (forward_kl if variant == "fused" else _plain)(student, teacher, 1.0)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logits = student.numel() * 4
    print(
        json.dumps(
            {
                "variant": variant,
                "vocab": vocab,
                "logits_gb": round(logits / 1e9, 3),
                "peak_rss_gb": round(peak / 1e9, 3),
                "above_inputs_gb": round((peak - base) / 1e9, 3),
                "above_inputs_in_logits": round((peak - base) / logits, 2),
                "loss": round(float(loss), 6),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "VOCAB"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    rows = []
    for family, vocab in VOCABS:
        for variant in ("plain", "fused"):
            cmd = [sys.executable, __file__, "--child", variant, str(vocab)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append({"family": family, **json.loads(out.strip().splitlines()[-1])})
            print(rows[-1])
    result = {
        **provenance(),
        "batch": BATCH,
        "seq_len": SEQ,
        "rows": rows,
    }
    (args.out / "kd_loss_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# KD loss memory: fused forward KL vs plain autograd",
        "",
        f"Machine: {result['machine']}; {result['versions']}. Command: `{result['command']}`.",
        f"One forward-KL loss + backward on ({BATCH}, {SEQ}, V) fp32 student and teacher "
        "logits, each case in a fresh process. 'Above inputs' is the peak RSS minus the RSS "
        "once both logits tensors exist, also in units of one logits tensor.",
        "",
        "| family | vocab | variant | one logits tensor GB | peak RSS GB | above inputs GB "
        "| above inputs (logits tensors) | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['vocab']} | {r['variant']} | {r['logits_gb']} "
            f"| {r['peak_rss_gb']} | {r['above_inputs_gb']} | {r['above_inputs_in_logits']} "
            f"| {r['loss']} |"
        )
    (args.out / "kd_loss_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
