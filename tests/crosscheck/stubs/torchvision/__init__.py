"""Test-only stand-in for torchvision (crosscheck only; see tests/crosscheck/conftest.py).

onnx2pytorch 0.6.0 imports torchvision.io / torchvision.ops at import time for a few ops (image decoding, ROI
pooling, NMS, deformable convolution) that no exported benchmark uses; installing the real torchvision would pull
another torch build. Calling any of these raises.
"""
