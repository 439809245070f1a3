"""Frontend: load a causal LM (HF directory, GGUF file, ONNX decoder) and export it to an onnx-ir graph.

This is the only layer that imports torch and transformers.
"""

import os

# onnxlm never downloads weights: models come from local paths or packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers' notices and tqdm bars would write through onnxlm's own progress display.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from onnxlm.frontend.source import Source, load_source, resolve_model_path

__all__ = ["Source", "load_source", "resolve_model_path"]
