"""dfosd: a deployment compiler for DFOSD one-step diffusion super-resolution.

The repository root is this package; each pipeline stage is a subpackage:
core (model definitions, contracts, checkpoints), training, export, calibration,
engines, runtime, bench. Importing dfosd loads no heavy library (no torch, no
onnxruntime, no tensorrt): every stage imports what it needs lazily.
"""

__version__ = "0.1.0"
