"""calibration stage of dfosd: INT8/FP8 quantization of the deployable parts with NVIDIA ModelOpt.

- ``data``      LR photos from a folder -> uint8 tiles of the export's tile size; file-list hash
- ``recipe``    what is quantized and how (``QuantRecipe``), without importing ModelOpt
- ``quantize``  ModelOpt config, sequential calibration through the pipeline, quantizer summary
- ``onnx_qdq``  Q/DQ ONNX export (TorchScript exporter) and FP8 custom ops -> standard ONNX
- ``export``    the calibration step of ``dfosd-export --precision int8|fp8``
- ``report``    PSNR / max-abs parity of exported pipelines vs the eager fp32 model
"""
