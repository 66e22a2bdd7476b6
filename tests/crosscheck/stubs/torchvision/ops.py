"""Stand-in for torchvision.ops (crosscheck only): the names onnx2pytorch imports; using them raises."""


def _missing(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"torchvision stub (tests/crosscheck/stubs): {name} is not available")
    return fn


deform_conv2d = _missing("deform_conv2d")
roi_pool = _missing("roi_pool")
roi_align = _missing("roi_align")
box_convert = _missing("box_convert")
nms = _missing("nms")
