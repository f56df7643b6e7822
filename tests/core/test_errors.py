from app.core.errors import public_message


def test_absolute_paths_are_cut_to_their_last_component():
    assert (
        public_message(
            "PermissionError: [Errno 13] Permission denied: '/srv/storage/jobs/j1/x.onnx'"
        )
        == "PermissionError: [Errno 13] Permission denied: 'x.onnx'"
    )
    assert (
        public_message("Load model from /srv/m.onnx failed:Load model /srv/m.onnx failed")
        == "Load model from m.onnx failed:Load model m.onnx failed"
    )
    assert public_message("CIFAR10 not found under /data/root/ (pre-fill it)") == (
        "CIFAR10 not found under root (pre-fill it)"
    )


def test_relative_paths_urls_and_fractions_are_left_alone():
    for text in (
        "archive member '../../etc/passwd' points outside the archive (..)",
        "cannot decode cats/0.png",
        "see https://example.org/a/b",
        "input [3, 32, 32] and/or 1/2 of the classes",
    ):
        assert public_message(text) == text
