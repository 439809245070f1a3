"""Constants that passes add to a graph, registered as initializers with their dtype and shape set (so that
later passes, shape inference and the checker see a typed value)."""

from __future__ import annotations

import numpy as np


def add_initializer(graph, name: str, array: np.ndarray):
    """A new constant value registered as an initializer of `graph`."""
    import onnx_ir as ir

    tensor = ir.tensor(np.ascontiguousarray(array))
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.initializers.add(value)
    return value
