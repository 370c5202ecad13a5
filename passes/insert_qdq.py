"""Mutation pass: insert fqt quantize / dequantize nodes as ``select_specs`` decided.

For each site that is not skipped:

* forward operands: ``fqt::quantize`` (``fqt::quantize_stochastic`` for stochastic rounding)
  -> aten dequantization (``(code - zp) * scale + offset``, cast back) before the forward GEMM;
  the GEMM consumes the dequantized value. Transforms (BHQ) and block scales use
  ``fqt::fake_quantize`` instead.
* backward GEMMs: the view chain from the forward operand is replayed on the dequantized value
  (reuse), optionally followed by a re-quantization; ``grad_output`` gets its own stochastic
  quantization per backward GEMM, so the two copies are independent (biprecision).
* ``convolution_backward`` computes grad_input, grad_weight and grad_bias in one node: it is
  split into one node per GEMM so each gets its own quantized ``grad_output``; grad_bias is the
  sum of the high-precision ``grad_output`` over all dims but its channels (the paper quantizes
  GEMM inputs only), a reduction Inductor fuses, which reads neither the input nor the weight.

Policy is never decided here: every choice comes from the Site objects.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from fqt_compiler.sites import GemmNodeInfo, QuantNodeInfo, QuantNodeKind
from fqt_compiler.specs import GemmKind, Granularity, QuantSpec, TensorRole


from fqt_compiler.passes import matchers as m
from fqt_compiler.passes.base import BackwardGemm, FQTPass, PassContext, Site
from fqt_compiler.passes.dequant_chain import emit_quantize
from fqt_compiler.passes.graph_utils import arg, arg_index, call, replay_views

aten = torch.ops.aten


def _prefer_recompute(dq: fx.Node) -> None:
    """Ask the min-cut partitioner to recompute the dequantization in the backward.

    Left alone, it sees the dequantized value feeding a backward GEMM ("materialized in
    backward") and saves it in high precision. Tagging the cheap pointwise dequant ops the way
    activation checkpointing does makes it save the low-bit codes and scales instead.
    """
    node = dq
    while isinstance(node.meta.get("fqt"), QuantNodeInfo) and node.meta["fqt"].what is QuantNodeKind.DEQUANTIZE:
        node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
        node = node.args[0]


_SWAPPED = {Granularity.ROW: Granularity.CHANNEL, Granularity.CHANNEL: Granularity.ROW}


def _placed(site: Site, role: TensorRole, spec: QuantSpec) -> QuantSpec:
    """The spec a quantizer of ``role`` runs with at ``site``. A transposed convolution's weight
    is (in channels, out channels / groups, *kernel): its output channels are dim 1, so the
    recipe's per-output-channel weight rows (ROW) are placed on dim 1 (CHANNEL) and its
    per-input-channel weights (CHANNEL) on dim 0 (ROW): the layouts its GEMMs can apply."""
    if role is not TensorRole.WEIGHT or not (m.is_conv(site.node) and arg(site.node, "transposed")):
        return spec
    return spec.with_(granularity=_SWAPPED[spec.granularity]) if spec.granularity in _SWAPPED else spec


class InsertQDQ(FQTPass):
    name = "insert_qdq"
    requires = ("find_sites", "select_specs")
    mutates = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        for site in ctx.sites:
            if site.skip is not None:
                continue
            dq = self._forward(graph, site, ctx)
            conv_bwd: dict[fx.Node, dict[int, tuple[fx.Node, fx.Node, fx.Node]]] = {}
            for bwd in site.backward:
                if bwd.skip is not None:
                    continue
                operand, grad = self._backward_operands(graph, site, bwd, dq, ctx)
                if bwd.conv_output is None:
                    bwd.node.update_arg(bwd.fwd_arg, operand)
                    bwd.node.update_arg(bwd.grad_arg, grad)
                    quantized = tuple(
                        i for i, s in ((bwd.fwd_arg, bwd.operand_spec), (bwd.grad_arg, bwd.grad_spec)) if s is not None
                    )
                    bwd.node.meta["fqt"] = GemmNodeInfo(site.site_id, bwd.kind, quantized)
                else:
                    conv_bwd.setdefault(bwd.node, {})[bwd.conv_output] = (grad, operand, bwd)
            for node, parts in conv_bwd.items():
                self._split_conv_backward(graph, site, node, parts, dq)
        graph.eliminate_dead_code()
        gm.recompile()

    # ------------------------------------------------------------------ forward
    def _forward(self, graph: fx.Graph, site: Site, ctx: PassContext) -> list[fx.Node | None]:
        dq: list[fx.Node | None] = [None, None]
        quantized = []
        for pos in (0, 1):
            spec = site.fwd_specs[pos]
            if spec is None:
                continue
            x = site.forward_operands[pos]
            info = QuantNodeInfo(site.site_id, GemmKind.OUTPUT, site.roles[pos], spec.key(), QuantNodeKind.QUANTIZE)
            with graph.inserting_before(site.node):
                dq[pos] = emit_quantize(graph, x, _placed(site, site.roles[pos], spec), site.layouts[pos], info, like=site.node,
                                        tag=None)
            _prefer_recompute(dq[pos])
            site.node.update_arg(site.operand_args[pos], dq[pos])
            quantized.append(site.operand_args[pos])
        site.node.meta["fqt"] = GemmNodeInfo(site.site_id, GemmKind.OUTPUT, tuple(quantized))
        return dq

    # ------------------------------------------------------------------ backward
    def _backward_operands(
        self, graph: fx.Graph, site: Site, bwd: BackwardGemm, dq: list[fx.Node | None], ctx: PassContext
    ) -> tuple[fx.Node, fx.Node]:
        node = bwd.node
        operand = node.args[bwd.fwd_arg]
        grad = node.args[bwd.grad_arg]
        role = site.roles[bwd.fwd_operand]
        fwd_spec = site.fwd_specs[bwd.fwd_operand]
        tag = "is_backward"
        with graph.inserting_before(node):
            if bwd.operand_spec is not None:
                if fwd_spec is not None:
                    source = dq[bwd.fwd_operand]
                    replay_info = QuantNodeInfo(site.site_id, bwd.kind, role, fwd_spec.key(), QuantNodeKind.REPLAY)
                    operand = replay_views(graph, bwd.chain, source, info=replay_info)
                if bwd.operand_spec != fwd_spec:
                    info = QuantNodeInfo(site.site_id, bwd.kind, role, bwd.operand_spec.key(), QuantNodeKind.QUANTIZE)
                    spec = _placed(site, role, bwd.operand_spec)
                    operand = emit_quantize(graph, operand, spec, bwd.fwd_layout, info, like=node, tag=tag)
            if bwd.grad_spec is not None:
                info = QuantNodeInfo(site.site_id, bwd.kind, TensorRole.GRAD_OUTPUT, bwd.grad_spec.key(), QuantNodeKind.QUANTIZE)
                grad = emit_quantize(graph, grad, bwd.grad_spec, bwd.grad_layout, info, like=node, tag=tag)
        return operand, grad

    def _split_conv_backward(
        self, graph: fx.Graph, site: Site, node: fx.Node, parts: dict[int, tuple], dq: list[fx.Node | None]
    ) -> None:
        """Replace one convolution_backward by one node per quantized GEMM (+ grad_bias)."""
        args = list(node.args)
        mask = list(arg(node, "output_mask"))
        mask_at = arg_index(node.target, "output_mask")
        new_outputs: dict[int, fx.Node] = {}
        # operands used only for their shape still come from the quantized side, so the
        # partitioner is never pushed to save a high-precision copy for them
        shape_input = dq[0] if dq[0] is not None else args[1]
        shape_weight = dq[1] if dq[1] is not None else args[2]
        with graph.inserting_before(node):
            for out_idx in (0, 1, 2):
                if not mask[out_idx]:
                    continue
                if out_idx == 2:  # grad_bias: dY summed over all but its channels (transposed too)
                    dims = [0, *range(2, args[0].meta["val"].dim())]
                    new_outputs[2] = call(graph, aten.sum.dim_IntList, (args[0], dims), like=node)
                    continue
                new_args = list(args)
                new_args[1], new_args[2] = shape_input, shape_weight
                new_args[mask_at] = [i == out_idx for i in range(3)]
                if out_idx in parts:
                    grad, operand, bwd = parts[out_idx]
                    new_args[0] = grad
                    new_args[bwd.fwd_arg] = operand
                    quantized = tuple(i for i, s in ((bwd.fwd_arg, bwd.operand_spec), (0, bwd.grad_spec)) if s is not None)
                    info = GemmNodeInfo(site.site_id, bwd.kind, quantized)
                else:  # a GEMM whose quantization was skipped: high precision
                    new_args[1], new_args[2] = args[1], args[2]
                    info = None
                split = call(graph, node.target, tuple(new_args), dict(node.kwargs), like=node)
                if info is not None:
                    split.meta["fqt"] = info
                new_outputs[out_idx] = call(graph, operator.getitem, (split, out_idx), like=node)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(new_outputs[user.args[1]])
                graph.erase_node(user)
        if node.users:
            raise AssertionError(f"convolution_backward {node.name} still has users after the split")
        graph.erase_node(node)


