"""Serving: Triton Inference Server model repositories, ``dfosd-serve``, a client, C++ runners.

- ``triton_repo``: writes a Triton model repository from an export directory (ONNX Runtime
  and TensorRT parts chained by ensembles, and a Python-backend model running dfosd's own
  runtime on images of any size).
- ``serve``: runs that Python-backend model in a real ``tritonserver`` (the binary PyPI's
  ``nvidia-pytriton`` ships) and stops it cleanly; ``cli`` is ``dfosd-serve``.
- ``scheduler``: fair tile scheduling across the Python model's pending requests, with deadlines.
- ``client``: the HTTP/gRPC client behind ``dfosd-trt-run --server``.
- ``loadgen``: latency/throughput under concurrency.
- ``cpp/``: a C++ runner (``dfosd_runner``) for AOTInductor packages and TensorRT plans.

Nothing here imports torch or tritonclient at module import time.
"""
