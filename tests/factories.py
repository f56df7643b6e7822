"""Small inputs a user would bring, made in the test: datasets in each advertised format and
teachers exported the way a user exports them (torch.jit, torch.onnx, safetensors), never
with Distillery's own exporter."""

from __future__ import annotations

import io
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

# Three classes told apart by colour alone: a model fed BGR instead of RGB confuses red and blue.
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 30)}


def digits(n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's offline digits: x (n,1,8,8) float32 in 0..16, y (n,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[:n, None].astype(np.float32), d.target[:n].astype(np.int64)


def digits_npz(path: Path, n: int = 600) -> Path:
    x, y = digits(n)
    np.savez_compressed(path, x=x, y=y, classes=np.array([str(i) for i in range(10)]))
    return path


def colour_images(per_class: int = 30, seed: int = 0) -> dict[str, bytes]:
    """`class/i.png` members: noisy solid-colour pictures of varied, non-square sizes, so the
    resize and the channel order both matter to a model trained on them."""
    rng = np.random.default_rng(seed)
    members = {}
    for cls, rgb in COLOURS.items():
        for i in range(per_class):
            h, w = int(rng.integers(12, 48)), int(rng.integers(12, 48))
            pixels = np.asarray(rgb, np.float32) + rng.normal(0, 25, (h, w, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
            members[f"{cls}/{i}.png"] = buf.getvalue()
    return members


def write_archive(path: Path, members: dict[str, bytes]) -> Path:
    """A .zip or .tar.gz (by the name's suffix) holding `members`."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return path
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def archive_images(path: Path) -> list[tuple[str, Image.Image]]:
    """(class, image) for every image in a .zip/.tar.gz written by write_archive."""
    out = []
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                out.append((name.split("/")[0], Image.open(io.BytesIO(zf.read(name)))))
    else:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                data = tf.extractfile(m).read()
                out.append((m.name.split("/")[0], Image.open(io.BytesIO(data))))
    return out


def fake_mnist(n: int = 1797) -> tuple[np.ndarray, np.ndarray]:
    """The digits upscaled to MNIST's 28x28 uint8 pictures: x (n,1,28,28), y (n,)."""
    x, y = digits(n)
    images = np.zeros((len(x), 1, 28, 28), np.uint8)
    images[:, 0, 2:26, 2:26] = np.kron(x[:, 0], np.ones((3, 3))) * 15
    return images, y


def fake_mnist_root(root: Path, name: str = "FashionMNIST", n_train: int = 1200) -> Path:
    """A pre-filled torchvision data root for MNIST-format `name` (MNIST, FashionMNIST): the
    digits upscaled to 28x28 in the idx files torchvision reads, so no download happens."""
    images, y = fake_mnist()
    images = images[:, 0]
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, sl in (("train", slice(0, n_train)), ("t10k", slice(n_train, None))):
        imgs, labels = images[sl], y[sl].astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, len(imgs), 28, 28) + imgs.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, len(labels)) + labels.tobytes()
        )
    return root


def decoded(members: dict[str, bytes], size: int) -> tuple[np.ndarray, np.ndarray]:
    """ImageFolder `class/i.png` members as a model card tells users to read them (RGB, the
    whole picture resized bilinearly): x (n,3,size,size) uint8, y (n,) by sorted class name."""
    classes = sorted({name.split("/")[0] for name in members})
    xs, ys = [], []
    for name, data in members.items():
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        xs.append(np.asarray(img, np.uint8).transpose(2, 0, 1))
        ys.append(classes.index(name.split("/")[0]))
    return np.stack(xs), np.asarray(ys, np.int64)


class SmallCNN(nn.Module):
    """A user's own teacher: a plain module, not one of Distillery's archs."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _fit(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 80) -> None:
    """Train as a user would before uploading, on `x` standardised per channel, as Distillery
    feeds a dataset to every model (its statistics come from its training split; these from
    all of `x`, which is close enough for the teacher to score far above chance)."""
    xs = torch.as_tensor(x, dtype=torch.float32)
    mean, std = xs.mean(dim=(0, 2, 3), keepdim=True), xs.std(dim=(0, 2, 3), keepdim=True)
    xs, ys = (xs - mean) / std.clamp_min(1e-6), torch.as_tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    model.eval()


def user_teacher(
    in_shape: tuple[int, ...],
    classes: int,
    path: Path,
    fmt: str,
    data: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """A teacher exported the way its owner would: TorchScript with torch.jit.trace + save,
    ONNX with torch.onnx.export (dynamic batch), safetensors of a registered arch's weights
    (`cnn_tiny`, which Distillery rebuilds from the name). Trained on `data` (x, y) first
    when given; untrained (chance accuracy) otherwise."""
    torch.manual_seed(0)
    example = torch.zeros(1, *in_shape)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        from worker.pipeline.archs import build_model

        model = build_model("cnn_tiny", in_shape, classes)
        if data is not None:
            _fit(model, *data)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path
    model = SmallCNN(in_shape[0], classes)
    if data is not None:
        _fit(model, *data)
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, example), str(path))
        else:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=["pixels"],
                output_names=["scores"],
                dynamic_axes={"pixels": {0: "n"}, "scores": {0: "n"}},
            )
    return path


# --- a model that int8 breaks in one known node ----------------------------------------------

OUTLIER_FEATURES, OUTLIER_CLASSES = 6, 3
# hidden1 reads a feature that is always 0 through a weight of 500: harmless in float, but with
# per-tensor weights its int8 scale (500 / 127, or / 63 at 7 bits) rounds every other weight,
# all 1, to 0. Returning hidden1 alone to float recovers the model; no other node does.
OUTLIER_NODES = ("hidden1", "hidden2", "logits")


def outlier_npz(path: Path, n: int = 240, seed: int = 0) -> Path:
    """Rows of 6 features: class k (of 3) has feature k high; feature 5 is always 0."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % OUTLIER_CLASSES
    x = rng.normal(0, 1, (n, OUTLIER_FEATURES)).astype(np.float32)
    x[np.arange(n), y] += 4.0
    x[:, -1] = 0.0
    np.savez(path, x=x, y=y.astype(np.int64))
    return path


def outlier_teacher(path: Path) -> Path:
    """An ONNX teacher for outlier_npz: hidden1 (identity but the outlier), hidden2
    (identity), logits (the first 3 features): nodes named as OUTLIER_NODES."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d, k = OUTLIER_FEATURES, OUTLIER_CLASSES
    w1 = np.eye(d, dtype=np.float32)
    w1[-1, -1] = 500.0
    w3 = np.eye(k, d, dtype=np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.eye(d, dtype=np.float32), "w2"),
        numpy_helper.from_array(w3, "w3"),
        *(
            numpy_helper.from_array(np.zeros(m, np.float32), f"b{i}")
            for i, m in ((1, d), (2, d), (3, k))
        ),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="hidden1", transB=1),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["h2"], name="hidden2", transB=1),
        helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], name="logits", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", k])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path
