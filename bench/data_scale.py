"""Datasets of real size: a job's memory must stay flat as its images grow, and the distill
stage must feed its model as fast as a hand-written torchvision loop.

Generated JPEG ImageFolder archives at 224 px (10 classes, each a colour and a stripe angle
under noise; made once and cached under bench/.cache/data_scale/), one `distillery run` job
per size with a small student, one epoch per stage (no baseline, prune or quantize). While a
job runs, the proportional set size (PSS) of its whole process tree (the job and its
DataLoader workers; RSS would count forked pages once per process) is sampled from
/proc/<pid>/smaps_rollup every 0.2 s; the peak is reported. The same run times a
hand-written torchvision `ImageFolder` + `DataLoader` loop (decoding the JPEGs each epoch)
training the same student with the same batch size, workers, threads and seed, and compares
images/s with the distill stage's (its training loop; the teacher's logits were cached
before it).

    python -m bench.data_scale [--sizes 1000 4000 16000] [--workers N] [--threads 2]
                               [--write docs/BENCHMARKS.md]

Targets: peak PSS at the largest size <= 1.25 x the peak at the smallest, and under 3 GB;
distill images/s >= 0.9 x the hand-written loop's at every size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

from bench.common import REPO, command_line, machine, utc_now, write_section

CACHE = REPO / "bench" / ".cache" / "data_scale"
SIZE_PX = 224
CLASSES = 10
STUDENT = {"arch": "cnn_tiny", "arch_kwargs": {"widths": [8, 16]}}
BATCH = 64
SEED = 0
LR = 1e-3


# --- data --------------------------------------------------------------------------------------


def _image(cls: int, rng: np.random.Generator) -> bytes:
    from PIL import Image

    hue = np.array([(cls * 37) % 256, (cls * 91 + 60) % 256, (cls * 53 + 120) % 256], np.float32)
    yy, xx = np.mgrid[0:SIZE_PX, 0:SIZE_PX].astype(np.float32)
    angle = np.pi * cls / CLASSES
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 6.0)[..., None] * 40
    pixels = hue + stripes + rng.normal(0, 30, (SIZE_PX, SIZE_PX, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def archive(n: int) -> Path:
    """`n` JPEGs at 224 px in an ImageFolder .zip (stored: JPEGs do not compress), made once."""
    path = CACHE / f"jpegs-{n}.zip"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    tmp = path.with_suffix(".part")
    started = time.perf_counter()
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            cls = i % CLASSES
            zf.writestr(f"class{cls}/{i:06d}.jpg", _image(cls, rng))
    tmp.rename(path)
    print(f"generated {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def extracted(n: int) -> Path:
    """The archive unpacked once, for the hand-written loop's ImageFolder."""
    root = CACHE / f"jpegs-{n}"
    if not root.exists():
        with zipfile.ZipFile(archive(n)) as zf:
            zf.extractall(root.with_suffix(".part"))
        root.with_suffix(".part").rename(root)
    return root


# --- memory of a process tree --------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_pss(pid: int) -> int:
    """PSS bytes of `pid` and all its descendants (each shared page split among its sharers,
    so forked DataLoader workers are not counted twice). psutil reads the same files."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        todo += _children(p)
    return total


def peak_pss(proc: subprocess.Popen, every: float = 0.2) -> dict:
    """Samples the tree of `proc` until it ends; {'peak': bytes} when it has."""
    seen = {"peak": 0}

    def sample() -> None:
        while proc.poll() is None:
            seen["peak"] = max(seen["peak"], tree_pss(proc.pid))
            time.sleep(every)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    seen["thread"] = t
    return seen


# --- the job and the hand-written loop ---------------------------------------------------------


def run_job(n: int, workers: int, threads: int, out: Path) -> dict:
    spec = {
        "name": f"data-scale-{n}",
        "dataset": {"source": "imagefolder", "path": str(archive(n)), "image_size": SIZE_PX},
        "teacher": {"source": "train", "arch": "cnn_tiny", "epochs": 1, "batch_size": BATCH},
        "student": STUDENT,
        "distill": {"epochs": 1, "baseline": False, "batch_size": BATCH, "lr": LR},
        "prune": None,
        "quantize": None,
        "evaluate": {"latency_runs": 5, "latency_warmup": 1, "latency_b32_runs": 0},
        "seed": SEED,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DATA_WORKERS": str(workers)}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "app.cli", "run", str(out / "spec.json")]
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "--out", str(out / "job"), "--json"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    mem = peak_pss(proc)
    stdout, stderr = proc.communicate()
    mem["thread"].join()
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"the {n}-image job failed: {stderr[-2000:]}")
    report = json.loads(stdout)
    contract = json.loads((out / "job" / "model_card.json").read_text())["input"]
    stages = {s["name"]: s for s in report["stages"]}
    train = report["dataset"]["num_train"]
    distill = stages["distill"]["metrics"]
    return {
        "n": n,
        "peak_pss": mem["peak"],
        "wall": time.perf_counter() - started,
        "data_seconds": stages["data"]["seconds"],
        "decode_ips": report["dataset"]["decode_images_per_second"],
        "train": train,
        "distill_ips": train / distill["train_seconds"],
        "student_accuracy": report["metrics"]["student"]["accuracy"],
        "mean": contract["mean"],
        "std": contract["std"],
    }


HAND_LOOP = """
import json, sys, time
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision.transforms import v2
from worker.pipeline.archs import build_model

a = json.loads(sys.argv[1])
torch.manual_seed(a["seed"])
tf = v2.Compose([
    v2.PILToTensor(),
    v2.Resize((a["px"], a["px"]), antialias=True),
    v2.ToDtype(torch.float32, scale=True),
    v2.Normalize(a["mean"], a["std"]),
])
ds = datasets.ImageFolder(a["root"], transform=tf)
g = torch.Generator().manual_seed(a["seed"])
ds = Subset(ds, torch.randperm(len(ds), generator=g)[: a["train"]].tolist())
loader = DataLoader(ds, batch_size=a["batch"], shuffle=True, generator=g,
                    num_workers=a["workers"], persistent_workers=a["workers"] > 0)
model = build_model("cnn_tiny", (3, a["px"], a["px"]), a["classes"], **a["kwargs"]).train()
opt = torch.optim.AdamW(model.parameters(), lr=a["lr"])
loss_fn = torch.nn.CrossEntropyLoss()
start = time.perf_counter()
for x, y in loader:
    loss = loss_fn(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
print(json.dumps({"seconds": time.perf_counter() - start, "n": len(ds)}))
"""


def run_hand_loop(n: int, job: dict, workers: int, threads: int) -> dict:
    args = {
        "root": str(extracted(n)),
        "px": SIZE_PX,
        "mean": job["mean"],
        "std": job["std"],
        "seed": SEED,
        "train": job["train"],
        "batch": BATCH,
        "workers": workers,
        "classes": CLASSES,
        "kwargs": STUDENT["arch_kwargs"],
        "lr": LR,
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HAND_LOOP, json.dumps(args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    mem = peak_pss(proc)
    stdout, stderr = proc.communicate()
    mem["thread"].join()
    if proc.returncode != 0:
        raise RuntimeError(f"the hand-written loop failed: {stderr[-2000:]}")
    out = json.loads(stdout)
    return {"ips": out["n"] / out["seconds"], "peak_pss": mem["peak"]}


# --- report ------------------------------------------------------------------------------------


def _gb(b: int) -> str:
    return f"{b / 1e9:.2f} GB"


def table(rows: list[dict]) -> str:
    head = (
        "| images (224 px) | data stage | decode | peak PSS, job tree | distill images/s | "
        "hand-written loop images/s | ratio | hand loop peak PSS | student accuracy |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(
        f"| {r['n']:,} | {r['data_seconds']:.0f} s | {r['decode_ips']:.0f} images/s | "
        f"{_gb(r['peak_pss'])} | {r['distill_ips']:.1f} | {r['hand_ips']:.1f} | "
        f"{r['distill_ips'] / r['hand_ips']:.2f}x | {_gb(r['hand_pss'])} | "
        f"{r['student_accuracy']:.3f} |"
        for r in rows
    )


def measure(sizes: list[int], workers: int, threads: int) -> list[dict]:
    rows = []
    for n in sizes:
        archive(n)
        with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
            job = run_job(n, workers, threads, Path(tmp))
        hand = run_hand_loop(n, job, workers, threads)
        job.update(hand_ips=hand["ips"], hand_pss=hand["peak_pss"])
        print(table([job]).splitlines()[-1], flush=True)
        rows.append(job)
    return rows


def verdict(rows: list[dict]) -> tuple[bool, list[str]]:
    first, last = rows[0], rows[-1]
    growth = last["peak_pss"] / first["peak_pss"]
    ratios = [r["distill_ips"] / r["hand_ips"] for r in rows]
    lines = [
        f"- peak PSS {last['n']:,} vs {first['n']:,} images: {growth:.2f}x (target <= 1.25x); "
        f"largest {_gb(last['peak_pss'])} (target < 3 GB)",
        f"- distill vs hand-written loop: {', '.join(f'{r:.2f}x' for r in ratios)} "
        "(target >= 0.9x at every size)",
    ]
    ok = growth <= 1.25 and last["peak_pss"] < 3e9 and min(ratios) >= 0.9
    return ok, lines


def section(rows: list[dict], workers: int, threads: int) -> str:
    ok, lines = verdict(rows)
    return f"""<!-- data_scale:start -->
## Datasets of real size: flat memory, and the data path as fast as a hand-written loop

Command: `{command_line()}`
Machine: {machine()}; {workers} DataLoader worker(s), OMP_NUM_THREADS={threads}
Date: {utc_now()}

One `distillery run` job per size: generated JPEG ImageFolder archives at 224 px ({CLASSES}
classes), teacher cnn_tiny and student cnn_tiny (widths 8, 16), one epoch each, batch {BATCH},
no baseline, prune or quantize. The data stage decodes each archive once (DataLoader workers)
into a uint8 cache that the stages read per batch. Peak PSS is summed over the job's process
tree (the job and its DataLoader workers), sampled every 0.2 s. The hand-written loop is
torchvision `ImageFolder` + `DataLoader` decoding the JPEGs each epoch (transforms.v2), training
the same student with the same batch size, workers, threads and seed in the same run; distill
images/s is the distill stage's training loop (its teacher logits were cached before it).

{table(rows)}

{chr(10).join(lines)}
- {"all targets met" if ok else "a target was missed"}
<!-- data_scale:end -->"""


def run(profile: str, write: Path | None) -> bool:
    sizes = [1000, 4000, 16000]
    return main(["--sizes", *map(str, sizes), *(["--write", str(write)] if write else [])]) == 0


def main(argv: list[str] | None = None) -> int:
    from worker.pipeline.limits import DataSettings

    parser = argparse.ArgumentParser(prog="python -m bench.data_scale", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--workers", type=int, default=DataSettings().resolved_workers())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)
    rows = measure(sorted(args.sizes), args.workers, args.threads)
    text = section(rows, args.workers, args.threads)
    print(text)
    if args.write:
        write_section(args.write, "data_scale", text)
    return 0 if verdict(rows)[0] else 1


if __name__ == "__main__":
    sys.exit(main())
