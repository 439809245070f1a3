"""onnxlm: a compiler-style optimization toolkit for causal language models on ONNX Runtime."""

__version__ = "0.1.0"

from onnxlm.errors import OnnxlmError
from onnxlm.api import Artifact, SessionSettings, load, optimize

__all__ = ["Artifact", "OnnxlmError", "SessionSettings", "__version__", "load", "optimize"]
