"""La RoSA (Layerwise Rotated Sparse Activation, Liu et al., ICML 2025, arXiv 2507.01299).

`rotate_residual` (lossless) puts layer l's residual stream in the eigenbasis Q_l of its calibration second
moment; `topk_sparsify` (lossy) keeps the largest entries per token of the rotated block inputs in decode.
`structure.py` finds the sub-blocks in the plain and the fused graph; `calibrate.py` computes Q_l.
"""
