"""La RoSA (Layerwise Rotated Sparse Activation, Liu et al., ICML 2025, arXiv 2507.01299).

`rotate_residual` (lossless) puts layer l's residual stream in the eigenbasis Q_l of its calibration second
moment; `topk_sparsify` (lossy) keeps the largest entries per token of the rotated block inputs in decode.
The sub-blocks come from the decoder-structure analysis (passes/decoder_structure.py); `calibrate.py`
computes Q_l.
"""
