"""GroupNorm(+SiLU) in an exported ONNX graph: a placeholder at trace time, lowered afterwards.

The TorchScript exporter traces every `GroupNormAct` through `onnx_group_norm_silu`, which
emits one placeholder node `fastddpm::GroupNormAct(x, weight, bias)` (attributes num_groups,
epsilon, silu) computing in float32. `lower_group_norm` then rewrites each placeholder into one
of two standard forms:

  "instancenorm"  Reshape [N, C, H, W] -> [N, G, C/G * H * W], InstanceNormalization (scale 1,
                  bias 0), Reshape back, Mul weight [C, 1, 1], Add bias [C, 1, 1] (+ x * Sigmoid(x)).
                  Every opset >= 6, and every ONNX Runtime execution provider has a kernel.
  "groupnorm21"   GroupNormalization-21 (per-channel scale and bias, float32 statistics via
                  stash_type = 1) (+ SiLU). Needs opset 21.

The traps that decided this (measured numbers in bench/bench_onnx.py and the issue report):
  * GroupNormalization-18 scales and shifts per *group*, not per channel (the spec bug fixed in
    opset 21); onnx >= 1.16 marks it deprecated and onnx.checker rejects a model that uses it.
  * ONNX Runtime (1.32 here) has no GroupNormalization kernel on the CPU: it expands the op's
    function body into Reshape/ReduceMean/Sub/Mul/Sqrt/Div nodes, slower than its native
    InstanceNormalization kernel.
  * ONNX Runtime's contrib com.microsoft.GroupNorm (NHWC, fused SiLU) exists for the CUDA and
    ROCm providers only, so a graph that names it does not load on a CPU host; ORT's own CUDA
    graph optimizer is the place that introduces it, not the exporter.
  * The TorchScript exporter stops at opset 20, and the dynamo exporter needs onnxscript; a
    "groupnorm21" graph is exported at opset 17 and moved to 21 by onnx.version_converter.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from fastddpm.errors import FastDDPMError

DOMAIN = "fastddpm"
PLACEHOLDER = "GroupNormAct"
FORMS = ("instancenorm", "groupnorm21")


class _GroupNormActOp(torch.autograd.Function):
    """GroupNorm(x) * weight + bias (+ SiLU) in float32; traced as one placeholder node."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups: int, silu: bool, eps: float):
        y = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(y) if silu else y

    @staticmethod
    def symbolic(g, x, weight, bias, num_groups: int, silu: bool, eps: float):
        y = g.op(f"{DOMAIN}::{PLACEHOLDER}", x, weight, bias, num_groups_i=num_groups, silu_i=int(silu),
                 epsilon_f=eps)
        y.setType(x.type())
        return y


def onnx_group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                         emb: torch.Tensor | None = None, silu: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """The `GroupNormAct.impl` used while exporting: x [N, C, H, W] (+ emb [N, C]) -> same shape and dtype.

    Statistics and affine run in float32 even in an fp16 export (as torch autocast keeps
    group_norm in float32); the result is cast back to x's dtype.
    """
    dtype = x.dtype
    x = x.float()
    if emb is not None:
        x = x + emb.float().reshape(emb.shape + (1,) * (x.ndim - 2))
    y = _GroupNormActOp.apply(x, weight.float(), bias.float(), int(num_groups), bool(silu), float(eps))
    return y.to(dtype)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _lower_one(node, index: int, form: str, consts: list) -> list:
    """The standard nodes that replace one placeholder (appending the constants they need to `consts`)."""
    a = _attrs(node)
    G, eps, silu = int(a["num_groups"]), float(a["epsilon"]), bool(a["silu"])
    x, weight, bias = node.input
    y = node.output[0]
    p = f"gn{index}_"
    out = y if not silu else p + "normed"
    nodes = []
    if form == "groupnorm21":
        nodes.append(helper.make_node("GroupNormalization", [x, weight, bias], [out], name=p + "GroupNorm",
                                      num_groups=G, epsilon=eps, stash_type=1))
    else:
        consts += [numpy_helper.from_array(np.array([0, G, -1], np.int64), p + "grouped_shape"),
                   numpy_helper.from_array(np.ones(G, np.float32), p + "ones"),
                   numpy_helper.from_array(np.zeros(G, np.float32), p + "zeros"),
                   numpy_helper.from_array(np.array([-1, 1, 1], np.int64), p + "channel_shape")]
        nodes += [
            helper.make_node("Shape", [x], [p + "shape"], name=p + "Shape"),
            helper.make_node("Reshape", [x, p + "grouped_shape"], [p + "grouped"], name=p + "Group"),
            helper.make_node("InstanceNormalization", [p + "grouped", p + "ones", p + "zeros"], [p + "inorm"],
                             name=p + "InstanceNorm", epsilon=eps),
            helper.make_node("Reshape", [p + "inorm", p + "shape"], [p + "ungrouped"], name=p + "Ungroup"),
            helper.make_node("Reshape", [weight, p + "channel_shape"], [p + "w"], name=p + "WeightShape"),
            helper.make_node("Reshape", [bias, p + "channel_shape"], [p + "b"], name=p + "BiasShape"),
            helper.make_node("Mul", [p + "ungrouped", p + "w"], [p + "scaled"], name=p + "Scale"),
            helper.make_node("Add", [p + "scaled", p + "b"], [out], name=p + "Shift"),
        ]
    if silu:
        nodes += [helper.make_node("Sigmoid", [out], [p + "sigmoid"], name=p + "Sigmoid"),
                  helper.make_node("Mul", [out, p + "sigmoid"], [y], name=p + "SiLU")]
    return nodes


def lower_group_norm(model: onnx.ModelProto, form: str) -> onnx.ModelProto:
    """Replace every fastddpm::GroupNormAct placeholder of `model` by the standard `form` (see FORMS).

    "groupnorm21" also moves the graph to opset 21. Returns a new ModelProto without the
    fastddpm opset import.
    """
    if form not in FORMS:
        raise FastDDPMError(f"unknown GroupNorm form {form!r}; choose one of {', '.join(map(repr, FORMS))}")
    if form == "groupnorm21":
        from onnx import version_converter

        model = version_converter.convert_version(model, 21)
    else:
        model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    new_nodes, consts, count = [], [], 0
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type == PLACEHOLDER:
            new_nodes += _lower_one(node, count, form, consts)
            count += 1
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(consts)
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model
