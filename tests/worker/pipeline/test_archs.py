import pytest
import torch

from worker.pipeline import prune
from worker.pipeline.archs import (
    ARCHS,
    apply_layer_config,
    build_model,
    check_arch,
    count_params,
    layer_config,
)
from worker.pipeline.context import StageContext
from worker.pipeline.distill import TeacherSignal
from worker.pipeline.errors import DatasetIncompatible
from worker.pipeline.spec import DistillSpec, PruneSpec


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("shape,classes", [((1, 28, 28), 10), ((3, 32, 32), 7)])
def test_torchvision_models_are_adapted_to_channels_size_and_classes(arch, shape, classes):
    model = build_model(arch, shape, classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, classes)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == shape[0] and first_conv.stride == (
        1,
        1,
    )  # small inputs keep resolution


def test_builtins_cover_images_and_feature_rows():
    assert build_model("mlp", (20,), 3)(torch.randn(4, 20)).shape == (4, 3)
    assert build_model("cnn_small", (3, 16, 16), 5)(torch.randn(4, 3, 16, 16)).shape == (4, 5)
    assert count_params(build_model("cnn_large", (1, 8, 8), 10)) > 20 * count_params(
        build_model("cnn_small", (1, 8, 8), 10)
    )
    with pytest.raises(DatasetIncompatible, match="needs images"):
        check_arch("resnet18", {}, (20,), 3)
    assert {"mlp", "cnn_small", "cnn_large", "resnet18", "mobilenet_v3_small"} <= set(ARCHS.names())


def test_a_pruned_torchvision_model_rebuilds_from_its_layer_config():
    """Pruned shapes recorded as data rebuild the model from the arch name: no pickling."""
    data_x = torch.randn(16, 3, 32, 32)
    model = build_model("mobilenet_v3_small", (3, 32, 32), 10).eval()

    class Data:  # the few DataBundle fields prune.run reads
        x_train, y_train = data_x, torch.arange(16) % 10
        x_test, y_test = data_x[:4], torch.arange(4)
        num_classes = 10

    signal = TeacherSignal(logits=torch.zeros(16, 10), online=None)
    pruned, metrics = prune.run(
        model,
        Data,
        PruneSpec(amount=0.4, finetune_epochs=0),
        DistillSpec(),
        signal,
        StageContext(),
        0,
    )
    assert metrics["params_after"] < 0.8 * metrics["params_before"]
    rebuilt = apply_layer_config(
        build_model("mobilenet_v3_small", (3, 32, 32), 10), layer_config(pruned)
    )
    rebuilt.load_state_dict(pruned.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(data_x[:2]), pruned(data_x[:2]), atol=1e-5)
