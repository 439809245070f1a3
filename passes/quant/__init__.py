"""Quantization passes: MatMulNBits weight-only (RTN, GPTQ), dynamic int8, GGUF-exact import, nested int8/4/2."""
