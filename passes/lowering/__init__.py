"""Lowering passes: rewrite the exported graph into ONNX Runtime's contrib ops for LLMs."""
