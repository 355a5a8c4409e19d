import pytest

from dash_kernels import backend
from dash_kernels.ops import _chunked


@pytest.fixture
def torch_backend():
    """Runs the test on the chunked torch backend, whatever the machine would pick."""
    with backend.use_backend("torch"):
        yield


@pytest.fixture(params=["default", "tiny"])
def chunking(request, monkeypatch):
    """'tiny' forces 16-row chunks and 1-row scratch tiles, so small shapes cross every chunk boundary."""
    if request.param == "tiny":
        monkeypatch.setattr(_chunked, "_CHUNK_BYTES", 1)
        monkeypatch.setattr(_chunked, "_SCRATCH_BYTES", 1)  # 1-row scratch tiles
    return request.param
