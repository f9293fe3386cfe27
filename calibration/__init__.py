"""calibration stage of dfosd: INT8/FP8 quantization of the deployable parts with NVIDIA ModelOpt.

- ``data``      LR photos from a folder -> uint8 tiles of the export's tile size; file-list hash
- ``recipe``    what is quantized and how (``QuantRecipe``), without importing ModelOpt
- ``quantize``  ModelOpt config, sequential calibration through the pipeline, quantizer summary
- ``export``    the calibration step of ``dfosd-export --precision int8|fp8`` (takes a ``QuantRecipe``)

The Q/DQ ONNX writer lives with the other writers in ``export.onnx_qdq``; parity of
exported pipelines against eager fp32 is measured in ``bench.parity``.
"""
