"""Every pass on every supported decoder family: which pass, which family, how long.

Tiny random models built from each family's real config class (``tests/family_models.py``:
hidden 64, ffn 128, 3 layers, 4/2 heads, the real SmolLM2 vocabulary), so this measures
*coverage* of the layouts (fused linears, biases, q/k norms, scaled embeddings, mixed
sliding/full layers), not quality. Each check asserts what ``tests/test_families.py`` does:

    python benchmarks/families.py            # -> benchmarks/results/families.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from family_models import FAMILY_NAMES, VOCAB, family_model  # noqa: E402

from slmcompress.arch import decoder_layers, family_for  # noqa: E402
from slmcompress.data import CalibrationSpec, DataConfig, EvalSpec  # noqa: E402
from slmcompress.eval.perplexity import perplexity  # noqa: E402
from slmcompress.fsutil import atomic_write_json, atomic_write_text  # noqa: E402
from slmcompress.io.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from slmcompress.io.sources import cache_dir  # noqa: E402
from slmcompress.layerwise import layerwise  # noqa: E402
from slmcompress.passes.base import Context  # noqa: E402
from slmcompress.passes.distill import DistillConfig, DistillPass  # noqa: E402
from slmcompress.passes.gptq import GPTQConfig, GPTQPass  # noqa: E402
from slmcompress.passes.prune import PruneConfig, PrunePass  # noqa: E402
from slmcompress.passes.quantize_rtn import RTNConfig, RTNPass  # noqa: E402
from slmcompress.prune.planner import sizes_of  # noqa: E402
from slmcompress.streaming.loader import build_skeleton  # noqa: E402
from slmcompress.streaming.residency import Residency  # noqa: E402
from slmcompress.streaming.sharded_writer import save_state_sharded  # noqa: E402
from slmcompress.versions import versions  # noqa: E402

log = logging.getLogger("families")
RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
TARGETS = {
    "prune mlp": {"ffn_hidden_size": 64},
    "prune heads": {"num_attention_heads": 2, "num_key_value_heads": 1},
    "prune hidden": {"hidden_size": 48},
    "prune depth": {"num_layers": 2},
}


class Bench:
    """One family's checks, sharing a tokenizer and a scratch directory."""

    def __init__(self, family: str, tokenizer, work: Path) -> None:
        self.family, self.tokenizer, self.work = family, tokenizer, work

    def ctx(self, name: str) -> Context:
        return Context(
            tokenizer=self.tokenizer,
            data=DataConfig(
                calibration=CalibrationSpec(source="c4", n_samples=8, seq_len=64),
                eval=EvalSpec(max_tokens=512, seq_len=128),
            ),
            device=torch.device("cpu"),
            dtype=torch.float32,
            original_model="tiny",
            teacher=None,
            stage_dir=self.work / name / "stage",
            work_dir=self.work / name / "work",
        )

    def model(self):
        return family_model(self.family)

    def prune(self, model, target, name, **extra):
        cfg = dict(type="prune", target=target, batch_size=2, depth_metric="cosine", align="none")
        return PrunePass(PruneConfig(**cfg | extra)).run(model, self.ctx(name))

    def same(self, a, b) -> None:
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key

    # ------------------------------------------------------------ checks
    def layerwise(self) -> None:
        model = self.model()
        assert family_for(model).name == self.family
        with torch.no_grad():
            expected = model(TOKENS, output_hidden_states=True).hidden_states
        for step in layerwise(model, TOKENS, torch.device("cpu"), batch_size=2):
            (out,) = step.forward(keep_outputs=True)
            step.set_outputs([out])
            if step.index < len(decoder_layers(model)) - 1:
                assert torch.equal(out, expected[step.index + 1])

    def prune_axis(self, target) -> None:
        pruned = self.prune(self.model(), target, "prune")
        out = self.work / "pruned"
        pruned.save_pretrained(out)
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            logits = reloaded(TOKENS).logits
            assert torch.isfinite(logits).all()
            torch.testing.assert_close(logits, pruned(TOKENS).logits)

    def noop(self) -> None:
        model = self.model()
        current = sizes_of(model.config)
        assert self.prune(model, {"ffn_hidden_size": current.ffn_hidden_size}, "noop") is model

    def quantize(self, method: str) -> None:
        if method == "rtn":
            qpass = RTNPass(RTNConfig(type="quantize", method="rtn", bits=4, group_size=48))
        else:
            qpass = GPTQPass(
                GPTQConfig(type="quantize", method="gptq", bits=4, group_size=48, act_order=True)
            )
        quantized = qpass.run(self.model(), self.ctx(method))
        save_checkpoint(quantized, self.tokenizer, self.work / method)
        reloaded, _ = load_checkpoint(self.work / method)
        with torch.no_grad():
            torch.testing.assert_close(
                reloaded(TOKENS).logits, quantized(TOKENS).logits, rtol=1e-4, atol=1e-4
            )

    def _source(self) -> Path:
        directory = self.work / "source"
        if not directory.exists():
            model = self.model()
            tied = getattr(model.config, "tie_word_embeddings", False)
            state = {
                k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
            }
            extra = {"config.json": model.config.to_json_string()}
            save_state_sharded(state, directory, 400_000, extra_files=extra)
            self.tokenizer.save_pretrained(directory)
        return directory

    def streamed_prune(self) -> None:
        src = self._source()
        target = {"hidden_size": 48, "num_layers": 2, "ffn_hidden_size": 96}
        cfg = PruneConfig(type="prune", target=target, depth_metric="cosine", align="none")
        expected = PrunePass(cfg).run(
            AutoModelForCausalLM.from_pretrained(src).eval(), self.ctx("sp-a")
        )
        result = PrunePass(cfg).run(*self.streamed(src, "sp-b"))
        self.same(expected, AutoModelForCausalLM.from_pretrained(result.path))

    def streamed_gptq(self) -> None:
        src = self._source()
        cfg = dict(type="quantize", method="gptq", bits=4, group_size=32, batch_size=4)
        load = lambda: AutoModelForCausalLM.from_pretrained(src).eval()  # noqa: E731
        expected = GPTQPass(GPTQConfig(**cfg)).run(load(), self.ctx("sg-a"))
        result = GPTQPass(GPTQConfig(**cfg)).run(*self.streamed(src, "sg-b"))
        self.same(expected, load_checkpoint(result.path)[0])

    def streamed(self, src: Path, name: str) -> tuple:
        """What the runner hands a pass for a streamed stage: a skeleton, a streamed context."""
        ctx = self.ctx(name)
        ctx.residency = Residency("streamed", Path(src))
        return build_skeleton(Path(src), torch.float32), ctx

    def distill_eval(self) -> None:
        teacher = self.model()
        teacher_dir = self.work / "teacher"
        teacher.save_pretrained(teacher_dir)
        self.tokenizer.save_pretrained(teacher_dir)
        student = self.prune(copy.deepcopy(teacher), {"ffn_hidden_size": 64}, "student")
        cfg = DistillConfig(
            type="distill",
            teacher=str(teacher_dir),
            max_steps=2,
            seq_len=16,
            micro_batch_size=2,
            eval_every=0,
            save_every=0,
        )
        ctx = self.ctx("distill")
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        healed = DistillPass(cfg).run(student, ctx)
        assert torch.isfinite(torch.tensor(perplexity(healed, TOKENS.flatten(), 20).ppl))

    def checks(self) -> dict[str, Callable[[], None]]:
        out: dict[str, Callable[[], None]] = {"layerwise calib == model": self.layerwise}
        for name, target in TARGETS.items():
            out[f"{name} -> plain reload"] = lambda t=target: self.prune_axis(t)
        out |= {
            "no-op prune identical": self.noop,
            "RTN-4 g48 -> reload": lambda: self.quantize("rtn"),
            "GPTQ-4 g48 act-order -> reload": lambda: self.quantize("gptq"),
            "streamed prune == in-memory": self.streamed_prune,
            "streamed GPTQ == in-memory": self.streamed_gptq,
            "KD (2 steps) + ppl": self.distill_eval,
        }
        return out


def run_family(family: str, tokenizer) -> dict[str, dict]:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(family, tokenizer, Path(tmp))
        for name, check in bench.checks().items():
            start = time.perf_counter()
            try:
                check()
                rows[name] = {"ok": True, "seconds": round(time.perf_counter() - start, 2)}
            except Exception as exc:  # noqa: BLE001 - a benchmark records failures
                log.error("%s / %s: %s", family, name, traceback.format_exc())
                rows[name] = {
                    "ok": False,
                    "seconds": round(time.perf_counter() - start, 2),
                    "error": str(exc).splitlines()[0][:200],
                }
            log.info("%s / %s: %s", family, name, rows[name])
    return rows


def render_md(result: dict) -> str:
    families = list(result["families"])
    checks = list(next(iter(result["families"].values())))
    lines = [
        "# Every pass on every decoder family (tiny random models)",
        "",
        "Tiny random models built from each family's real config class (hidden 64, ffn 128, "
        "3 layers, 4 query / 2 KV heads, SmolLM2's 49152 vocabulary; Qwen3 head_dim 24, "
        "Gemma 3 head_dim 32 with sliding window 8 on layers 0 and 2; Phi-3 fused qkv and "
        "gate_up). These measure layout coverage, not quality. Cell: pass/FAIL and seconds "
        "(wall time on a 2-core machine shared with other jobs: indicative only; the first "
        "check of a run also pays one-off warm-up).",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['platform']}, {result['machine']['threads']} threads; "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + f". Total {result['wall_s']} s.",
        "",
        "| check | " + " | ".join(families) + " |",
        "|---|" + "---|" * len(families),
    ]
    for check in checks:
        cells = []
        for fam in families:
            row = result["families"][fam][check]
            cells.append(f"{'pass' if row['ok'] else '**FAIL**'} {row['seconds']:.1f}s")
        lines.append(f"| {check} | " + " | ".join(cells) + " |")
    totals = [f"{sum(r['seconds'] for r in result['families'][f].values()):.1f}s" for f in families]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    failures = [
        f"- {f} / {c}: {r['error']}"
        for f in families
        for c, r in result["families"][f].items()
        if not r["ok"]
    ]
    lines += ["", "## Failures", *(failures or ["none"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILY_NAMES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("slmcompress").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir() / "models" / "smollm2-135m")
    start = time.perf_counter()
    result = {
        "command": "python " + " ".join(["benchmarks/families.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "versions": versions(),
        "families": {f: run_family(f, tokenizer) for f in args.families.split(",")},
    }
    result["wall_s"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out / "families.json", result)
    atomic_write_text(args.out / "families.md", render_md(result))
    log.info("wrote %s", args.out / "families.md")


if __name__ == "__main__":
    main()
