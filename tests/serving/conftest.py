"""The serving tests' one dfosd-serve (session scope: tritonserver's start-up is the expensive part)."""

from __future__ import annotations

import pytest
from serve_helpers import ADMIN_KEY, TILE_BATCH, ServeProcess


@pytest.fixture(scope="session")
def server(tiny_export_fp32, tmp_path_factory):
    proc = ServeProcess(tiny_export_fp32, tmp_path_factory.mktemp("serve") / "server.log", "--admin-key", ADMIN_KEY)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def local(tiny_export_fp32):
    """The in-process runtime on the same export: (image CHW uint8 torch) -> CHW output."""
    from dfosd.runtime.step import OneStepRunner
    from dfosd.runtime.tiling import TilingConfig, upscale_tiled

    runner = OneStepRunner(tiny_export_fp32, backend="onnxruntime", batch=TILE_BATCH, say=lambda m: None)

    def run(image, overlap=None):
        cfg = TilingConfig(tile=runner.tile, overlap=runner.tile // 4 if overlap is None else overlap,
                           batch=runner.batch, scale=runner.scale)
        return upscale_tiled(image, runner, cfg)

    return run
