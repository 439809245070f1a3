"""Write K-quant GGUF files of the embedded SmolLM2 with llama.cpp's own quantizer (llama-cpp-python, see
bench/common.py: llama_cpp_model), for the K-quant rows of bench_quant.py. The embedded file is Q4_1, so these are
requantized from its dequantized weights (llama.cpp's --allow-requantize): what matters here is that onnxlm and
llama.cpp run the same file. SmolLM2's rows of 576 are not multiples of 256, so llama.cpp falls back to Q5_0/Q5_1/
Q8_0 for those tensors and only the MLP's down projection (1536 columns) gets K-quant blocks.
    python bench/requantize_gguf.py [Q4_K_M Q5_K_M Q6_K]   # -> bench/.cache/smollm2-<TYPE>.gguf
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import ROOT  # noqa: E402

from onnxlm.frontend.source import resolve_model_path  # noqa: E402


def requantize(kind: str) -> Path:
    import llama_cpp

    out = ROOT / "bench" / ".cache" / f"smollm2-{kind}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(resolve_model_path("smollm2-135m")).encode(), str(out).encode(), ctypes.byref(params)):
        raise SystemExit(f"llama.cpp could not quantize to {kind}")
    return out


if __name__ == "__main__":
    for kind in sys.argv[1:] or ["Q4_K_M", "Q5_K_M", "Q6_K"]:
        print(requantize(kind))
