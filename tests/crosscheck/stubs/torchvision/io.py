"""Stand-in for torchvision.io (crosscheck only): the names onnx2pytorch imports; using them raises."""


class ImageReadMode:
    UNCHANGED = 0


def decode_image(*args, **kwargs):
    raise NotImplementedError("torchvision stub (tests/crosscheck/stubs): decode_image is not available")
