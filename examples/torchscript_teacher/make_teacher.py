"""Train a digits CNN and save it as TorchScript, the way a user brings their own teacher
(TorchScript is accepted; a torch.save pickle is not). Writes examples/torchscript_teacher/teacher.pt."""

from pathlib import Path

import torch

from worker.pipeline.context import StageContext
from worker.pipeline.data import load_dataset
from worker.pipeline.spec import BuiltinDataset, TrainedTeacher
from worker.pipeline.teacher import run

if __name__ == "__main__":
    data = load_dataset(BuiltinDataset(), seed=0)
    teacher = run(TrainedTeacher(arch="cnn_large", epochs=15), data, StageContext(), seed=0).module
    scripted = torch.jit.trace(teacher.eval(), data.x_test[:1])
    out = Path(__file__).with_name("teacher.pt")
    torch.jit.save(scripted, str(out))
    print(out, f"accuracy {(teacher(data.x_test).argmax(1) == data.y_test).float().mean():.4f}")
