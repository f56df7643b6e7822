"""Does int8 pay on this host? int8 vs fp32 latency on ONNX Runtime (CPU), as a ratio with its
95% interval from interleaved rounds (worker/pipeline/speed.py, what a job's choice and its
`min_speedup` gate rest on), at batch 1 and 32, for a tiny model and a larger one.

    python -m bench.quantization [--size PX] [--rounds N] [--threads T] [--write docs/BENCHMARKS.md]

Models (random weights: latency does not depend on their values, nor on the calibration data):
  tiny      the digits student, cnn_tiny on 1x8x8 inputs
  resnet18  torchvision's resnet18 on 3xPXxPX inputs (default 96 px; `full` profile 224 px)
Each is exported to fp32 ONNX the way a job does, then quantized by the job's int8_static
(QDQ, per-channel) with 8-bit and with 7-bit weights (`quantize.weight_bits`). The host's
int8 CPU flags are printed with the table. The latency part of issue 23's benchmark only: the
accuracy part (accuracy-controlled PTQ, QAD, sensitivity) is not here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import command_line, machine, utc_now, write_section
from worker.pipeline import speed
from worker.pipeline.export import export_onnx
from worker.pipeline.quantize import QUANTIZERS
from worker.pipeline.spec import QuantizeSpec


def _models(size: int) -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    import torchvision

    from worker.pipeline.archs import build_model

    torch.manual_seed(0)
    tiny = build_model("cnn_tiny", (1, 8, 8), 10).eval()
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    return {
        "tiny (cnn_tiny, 8 px)": (tiny, (1, 8, 8)),
        f"resnet18 ({size} px)": (resnet, (3, size, size)),
    }


def measure(size: int, rounds: int, threads: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, shape) in _models(size).items():
            x = torch.randn(64, *shape)
            fp32 = export_onnx(model, x, Path(tmp) / "fp32.onnx")
            for bits in (8, 7):
                int8 = Path(tmp) / f"int8_{bits}.onnx"
                QUANTIZERS.get("int8_static").run(fp32, int8, x, QuantizeSpec(weight_bits=bits))
                for batch in (1, 32):
                    c = speed.compare(
                        fp32, int8, x[:1].numpy(), batch=batch, rounds=rounds, threads=threads
                    )
                    rows.append({"model": name, "bits": bits, **c})
                    print(name, bits, batch, round(c["speedup"], 3), c["ci"], flush=True)
    return rows


def render(rows: list[dict], args: argparse.Namespace) -> str:
    cap = speed.host()
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in cap["flags"].items())
    lines = [
        "<!-- quantization:start -->",
        "## Does int8 pay? int8 vs fp32 latency with its interval",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}  ",
        f"Date: {utc_now()}  ",
        f"CPU int8 flags: {flags} (a job's default weight width here: {cap['weight_bits']} bits)",
        "",
        f"ONNX Runtime, CPU, {args.threads} intra-op thread(s); speedup = fp32 latency / int8 "
        f"latency, geometric mean over {args.rounds} interleaved rounds with its 95% "
        "bootstrap interval (a job calls it `faster` only when the interval lies above 1.05, "
        "`slower` below 1/1.05).",
        "",
        "| model | weights | batch | fp32 ms | int8 ms | speedup | 95% interval | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["ci"]
        lines.append(
            f"| {r['model']} | {r['bits']}-bit | {r['batch']} | {r['a_ms']:.4f} | "
            f"{r['b_ms']:.4f} | {r['speedup']:.2f}x | {lo:.2f}-{hi:.2f} | {r['verdict']} |"
        )
    lines.append("<!-- quantization:end -->")
    return "\n".join(lines)


def run(profile: str, write: Path | None) -> bool:
    args = ["--size", "224"] if profile == "full" else []
    return main(args + (["--write", str(write)] if write else [])) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__)
    parser.add_argument("--size", type=int, default=96, help="resnet18 input size (px)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = render(measure(args.size, args.rounds, args.threads), args)
    print(text)
    if args.write:
        write_section(args.write, "quantization", text)
    return 0  # no target: it reports what int8 buys here


if __name__ == "__main__":
    sys.exit(main())
