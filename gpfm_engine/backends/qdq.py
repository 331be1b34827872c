"""FP8 (E4M3) quantize/dequantize pairs around the linear layers of an exported ONNX graph.

TensorRT's strongly typed mode (the only mode in 11.x) takes precision from the graph: explicit
QuantizeLinear/DequantizeLinear pairs on a MatMul's two inputs make it an FP8 GEMM. We quantize the
MatMuls whose second input is a weight initializer — every ``nn.Linear`` (qkv, proj, fc1, fc2),
~96% of ViT-L's FLOPs — with per-tensor scales (``amax / 448``) for weights and activations, as
ModelOpt's default FP8 recipe does. Attention matmuls, softmax and LayerNorm stay in the graph's
precision. Activation ranges come from calibration batches run through ONNX Runtime, so the
whole pass is testable on a CPU (ORT executes FP8 Q/DQ).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP8_E4M3_MAX = 448.0
QDQ_OPSET = 19  # first opset whose QuantizeLinear/DequantizeLinear accept float8 types


def _weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer if len(i.dims) == 2 and i.data_type == TensorProto.FLOAT}


def linear_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a 2-D float initializer (the exported ``nn.Linear``s)."""
    weights = _weights(model)
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def calibrate_amax(model: onnx.ModelProto, batches: Sequence[np.ndarray], input_name: str) -> dict[str, float]:
    """Max |value| of every linear layer's activation input over the calibration batches (ORT, CPU)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = sorted({n.input[0] for n in linear_matmuls(model)})
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in known)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    amax = dict.fromkeys(names, 0.0)
    for batch in batches:
        for name, value in zip(names, session.run(names, {input_name: np.ascontiguousarray(batch, np.float32)})):
            amax[name] = max(amax[name], float(np.abs(value).max()))
    return amax


def _scale(name: str, amax: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(max(amax, 1e-12) / FP8_E4M3_MAX, np.float32), name)


def insert_fp8_qdq(model: onnx.ModelProto, act_amax: dict[str, float]) -> onnx.ModelProto:
    """A copy of ``model`` with FP8 Q/DQ pairs on both inputs of every linear MatMul (opset >= 19)."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < QDQ_OPSET:
        raise ValueError(f"FP8 Q/DQ needs an opset >= {QDQ_OPSET} graph, this one is opset {opset}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    weights = _weights(out)
    zero = helper.make_tensor("fp8_zero_point", TensorProto.FLOAT8E4M3FN, [], [0])
    graph.initializer.append(zero)
    new_nodes: list[onnx.NodeProto] = []
    done: dict[str, str] = {}  # tensor -> its dequantized name (a tensor feeding several MatMuls)

    def qdq(tensor: str, amax: float) -> str:
        if tensor not in done:
            scale = _scale(f"{tensor}_fp8_scale", amax)
            graph.initializer.append(scale)
            q, dq = f"{tensor}_fp8_q", f"{tensor}_fp8_dq"
            new_nodes.append(helper.make_node("QuantizeLinear", [tensor, scale.name, zero.name], [q], name=q))
            new_nodes.append(helper.make_node("DequantizeLinear", [q, scale.name, zero.name], [dq], name=dq))
            done[tensor] = dq
        return done[tensor]

    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)  # detached from the field that is rebuilt below
        if node.op_type == "MatMul" and node.input[1] in weights:
            weight = numpy_helper.to_array(weights[node.input[1]])
            node.input[0] = qdq(node.input[0], act_amax[node.input[0]])
            node.input[1] = qdq(node.input[1], float(np.abs(weight).max()))
        new_nodes.append(node)
    # Each Q/DQ pair sits right before its first consumer and after its producer: still topological.
    del graph.node[:]
    graph.node.extend(new_nodes)
    return out

