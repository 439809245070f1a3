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


def add_overridable_input(graph, name: str, default: np.ndarray):
    """A graph input that is also an initializer holding `default`: ORT (and onnxruntime-genai) feed the default
    when the caller leaves the input out, so a run-time switch costs deployments nothing."""
    import onnx_ir as ir

    tensor = ir.tensor(default)  # not add_initializer: np.ascontiguousarray would make a scalar (1,)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.inputs.append(value)
    graph.initializers.add(value)
    return value
