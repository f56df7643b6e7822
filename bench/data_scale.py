"""Datasets of real size: a job's memory must stay flat as its images grow, and the distill
stage must feed its model as fast as a hand-written torchvision loop.

Generated JPEG ImageFolder archives at 224 px (10 classes, each a colour and a stripe angle
under noise; made once and cached under bench/.cache/data_scale/), one `distillery run` job
per size with a small student, one epoch per stage (no baseline, prune or quantize). While a
job runs, the proportional set size (PSS) of its whole process tree (the job and its
DataLoader workers; RSS would count forked pages once per process) is sampled from
/proc/<pid>/smaps_rollup every 0.5 s; the peak is reported. The same run then times, in
alternating rounds, the distill stage's training loop on the job's decoded cache and a
hand-written torchvision `ImageFolder` + `DataLoader` loop (decoding the JPEGs each epoch)
training the same student with the same batch size, workers, threads and seed.

    python -m bench.data_scale [--sizes 1000 4000 16000] [--workers N] [--threads 2]
                               [--loop-images 1024] [--rounds 3] [--write docs/BENCHMARKS.md]

Targets: peak PSS at the largest size <= 1.25 x the peak at the smallest, and under 3 GB;
distill images/s >= 0.9 x the hand-written loop's at every size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
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


def peak_pss(proc: subprocess.Popen, every: float = 0.5) -> dict:
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
    proc, stdout, stderr, mem = _measured([*cmd, "--out", str(out / "job"), "--json"], env)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"the {n}-image job failed: {stderr[-2000:]}")
    report = json.loads(stdout)
    contract = json.loads((out / "job" / "model_card.json").read_text())["input"]
    stages = {s["name"]: s for s in report["stages"]}
    train = report["dataset"]["num_train"]
    distill = stages["distill"]["metrics"]
    return {
        "n": n,
        "job": out / "job",
        "peak_pss": mem["peak"],
        "wall": time.perf_counter() - started,
        "data_seconds": stages["data"]["seconds"],
        "decode_ips": report["dataset"]["decode_images_per_second"],
        "train": train,
        "job_distill_ips": train / distill["train_seconds"],
        "student_accuracy": report["metrics"]["student"]["accuracy"],
        "mean": contract["mean"],
        "std": contract["std"],
    }


HAND_LOOP = """
import json, resource, sys, time
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
ds = Subset(ds, torch.randperm(len(ds), generator=g)[: a["images"]].tolist())
loader = DataLoader(ds, batch_size=a["batch"], shuffle=True, generator=g,
                    num_workers=a["workers"], persistent_workers=a["workers"] > 0)
model = build_model("cnn_tiny", (3, a["px"], a["px"]), a["classes"], **a["kwargs"]).train()
opt = torch.optim.AdamW(model.parameters(), lr=a["lr"])
loss_fn = torch.nn.CrossEntropyLoss()
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

start, cpu0 = time.perf_counter(), cpu()
for x, y in loader:
    loss = loss_fn(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
seconds = time.perf_counter() - start
if loader._iterator is not None:  # reap the workers: their CPU time counts
    loader._iterator._shutdown_workers()
print(json.dumps({"seconds": seconds, "cpu": cpu() - cpu0, "n": len(ds)}))
"""

# The distill stage's own loop (train.fit with the KD loss against the job's cached teacher
# logits) on the job's decoded cache, over the same number of images.
DISTILL_LOOP = """
import json, resource, sys
from pathlib import Path
import numpy as np, torch
from worker.pipeline.archs import build_model
from worker.pipeline.context import StageContext
from worker.pipeline.data import load_dataset
from worker.pipeline.limits import DataSettings
from worker.pipeline.losses import build_kd_loss
from worker.pipeline.spec import DistillSpec, ImageFolderDataset
from worker.pipeline.train import TrainConfig, fit

a = json.loads(sys.argv[1])
spec = ImageFolderDataset(source="imagefolder", path=a["archive"], image_size=a["px"])
settings = DataSettings(workers=a["workers"], resident_bytes=0)
data = load_dataset(spec, a["seed"], workdir=Path(a["job"]) / ".work" / "tmp-data", settings=settings)
logits = torch.from_numpy(np.load(a["logits"], mmap_mode="c"))
x, y = data.x_train.subset(np.arange(a["images"])), data.y_train[: a["images"]]
torch.manual_seed(a["seed"])
model = build_model("cnn_tiny", data.input_shape, data.num_classes, **a["kwargs"])
d = DistillSpec(epochs=1, lr=a["lr"], batch_size=a["batch"])
cfg = TrainConfig(1, d.lr, d.weight_decay, d.batch_size, False, d.amp, a["seed"])
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

cpu0 = cpu()  # fit ends its DataLoader workers: their CPU time is counted
parts = fit(model, x, y, cfg=cfg, loss_fn=build_kd_loss(d), ctx=StageContext(),
            teacher_logits=logits[: a["images"]])
print(json.dumps({"seconds": parts["train_seconds"], "cpu": cpu() - cpu0, "n": a["images"]}))
"""


def _measured(cmd: list[str], env: dict[str, str]):
    """Run `cmd` to its end with the peak PSS of its process tree sampled meanwhile."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    mem = peak_pss(proc)
    stdout, stderr = proc.communicate()
    mem["thread"].join()
    return proc, stdout, stderr, mem


def _loop(script: str, args: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc, stdout, stderr, mem = _measured([sys.executable, "-c", script, json.dumps(args)], env)
    if proc.returncode != 0:
        raise RuntimeError(f"a training loop failed: {stderr[-2000:]}")
    out = json.loads(stdout)
    return {"ips": out["n"] / out["seconds"], "ipc": out["n"] / out["cpu"], "peak_pss": mem["peak"]}


def compare_loops(n: int, job: dict, workers: int, threads: int, images: int, rounds: int):
    """Images/s of the hand-written loop and of the distill stage's loop, on the same number
    of images, alternating (hand first, then distill first) so that a machine whose load
    drifts weighs on both: the median of each over the rounds."""
    common = {"px": SIZE_PX, "seed": SEED, "batch": BATCH, "workers": workers, "lr": LR}
    common |= {"kwargs": STUDENT["arch_kwargs"], "images": min(images, job["train"])}
    hand = {**common, "root": str(extracted(n)), "mean": job["mean"], "std": job["std"]}
    hand["classes"] = CLASSES
    ours = {**common, "archive": str(archive(n)), "job": str(job["job"])}
    ours["logits"] = str(job["job"] / ".work" / "checkpoints" / "distill" / "teacher_logits.npy")
    rates: dict[str, list[float]] = {k: [] for k in ("hand", "distill", "hand_pss")}
    rates |= {"hand_ipc": [], "distill_ipc": []}
    for r in range(rounds):
        order = [("hand", HAND_LOOP, hand), ("distill", DISTILL_LOOP, ours)]
        for name, script, args in order if r % 2 == 0 else order[::-1]:
            got = _loop(script, args, threads)
            rates[name].append(got["ips"])
            rates[f"{name}_ipc"].append(got["ipc"])
            if name == "hand":
                rates["hand_pss"].append(got["peak_pss"])
    print({k: [round(v, 2) for v in vs] for k, vs in rates.items() if "pss" not in k}, flush=True)
    return {
        "hand_ips": statistics.median(rates["hand"]),
        "distill_ips": statistics.median(rates["distill"]),
        "hand_ipc": statistics.median(rates["hand_ipc"]),
        "distill_ipc": statistics.median(rates["distill_ipc"]),
        "hand_pss": max(rates["hand_pss"]),
        "loop_images": common["images"],
        "rounds": rounds,
    }


# --- report ------------------------------------------------------------------------------------


def _gb(b: int) -> str:
    return f"{b / 1e9:.2f} GB"


def table(rows: list[dict]) -> str:
    head = (
        "| images (224 px) | data stage | decode | peak PSS, job tree | job: distill stage "
        "images/s | loops: distill images/s | loops: hand-written images/s | ratio | "
        "loops: distill / hand-written, images per CPU-second | hand loop peak PSS | "
        "student accuracy |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(
        f"| {r['n']:,} | {r['data_seconds']:.0f} s | {r['decode_ips']:.0f} images/s | "
        f"{_gb(r['peak_pss'])} | {r['job_distill_ips']:.1f} | {r['distill_ips']:.1f} | "
        f"{r['hand_ips']:.1f} | {r['distill_ips'] / r['hand_ips']:.2f}x | "
        f"{r['distill_ipc']:.1f} / {r['hand_ipc']:.1f} = {r['distill_ipc'] / r['hand_ipc']:.2f}x | "
        f"{_gb(r['hand_pss'])} | "
        f"{r['student_accuracy']:.3f} |"
        for r in rows
    )


def measure(sizes: list[int], args: argparse.Namespace, done=None) -> list[dict]:
    """One job and `rounds` loop pairs per size; `done(rows)` after each size."""
    rows = []
    for n in sizes:
        archive(n)
        with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
            job = run_job(n, args.workers, args.threads, Path(tmp))
            loops = compare_loops(n, job, args.workers, args.threads, args.loop_images, args.rounds)
        job.update(loops)
        print(table([job]).splitlines()[-1], flush=True)
        rows.append(job)
        if done is not None:
            done(rows)
    return rows


def verdict(rows: list[dict]) -> tuple[bool, list[str]]:
    first, last = rows[0], rows[-1]
    growth = last["peak_pss"] / first["peak_pss"]
    ratios = [r["distill_ips"] / r["hand_ips"] for r in rows]
    per_cpu = [r["distill_ipc"] / r["hand_ipc"] for r in rows]
    lines = [
        f"- peak PSS {last['n']:,} vs {first['n']:,} images: {growth:.2f}x (target <= 1.25x); "
        f"largest {_gb(last['peak_pss'])} (target < 3 GB)",
        f"- distill vs hand-written loop, images/s: {', '.join(f'{r:.2f}x' for r in ratios)} "
        "(target >= 0.9x at every size)",
        f"- the same, images per CPU-second of the loop's process tree (what the load of other "
        f"processes on a shared machine does not change): "
        f"{', '.join(f'{r:.2f}x' for r in per_cpu)}",
    ]
    ok = growth <= 1.25 and last["peak_pss"] < 3e9 and min(ratios) >= 0.9
    return ok, lines


def section(rows: list[dict], args: argparse.Namespace) -> str:
    ok, lines = verdict(rows)
    return f"""<!-- data_scale:start -->
## Datasets of real size: flat memory, and the data path as fast as a hand-written loop

Command: `{command_line()}`
Machine: {machine()}; {args.workers} DataLoader worker(s), OMP_NUM_THREADS={args.threads}
Date: {utc_now()}

One `distillery run` job per size: generated JPEG ImageFolder archives at 224 px ({CLASSES}
classes), teacher cnn_tiny and student cnn_tiny (widths 8, 16), one epoch each, batch {BATCH},
no baseline, prune or quantize. The data stage decodes each archive once (DataLoader workers)
into a uint8 cache that the stages read per batch. Peak PSS is summed over the job's process
tree (the job and its DataLoader workers), sampled every 0.5 s. The hand-written loop is
torchvision `ImageFolder` + `DataLoader` decoding the JPEGs each epoch (transforms.v2), training
the same student (cross-entropy) with the same batch size, workers, threads and seed. "job:
distill stage images/s" is the job's own distill training loop (its teacher logits cached
before it; one epoch, so it includes the DataLoader workers' start). On a shared machine whose
load drifts, the comparison is made on loops run alternately in this run: the distill stage's
loop (`train.fit`, KD loss against the job's cached logits, reading the job's decoded cache)
and the hand-written loop, each over the same {max(r["loop_images"] for r in rows):,} training images
(fewer when the split is smaller), {rows[0]["rounds"]} rounds, median images/s of each. Student
accuracy is after one epoch (tens of optimizer steps): not a target, shown as a sanity check.

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
    parser.add_argument("--loop-images", type=int, default=1024, help="per loop measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating loop pairs")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)

    def done(rows: list[dict]) -> None:  # each size as it ends: a cut run keeps what it measured
        if args.write:
            write_section(args.write, "data_scale", section(rows, args))

    rows = measure(sorted(args.sizes), args, done)
    print(section(rows, args))
    return 0 if verdict(rows)[0] else 1


if __name__ == "__main__":
    sys.exit(main())
