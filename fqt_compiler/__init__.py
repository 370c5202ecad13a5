"""fqt: a torch.compile backend for fully quantized training.

    import torch, fqt_compiler as fqt
    torch.compile(model, backend="fqt")                                   # default recipe int8
    torch.compile(model, backend="fqt", options={"recipe": "bhq5"})
    torch.compile(model, backend=fqt.backend(recipe="psq8", strict=True))
    print(fqt.explain(model, x, recipe="bhq8"))
    fqt.compile_sharded(fsdp2_model, recipe="int8")                       # FSDP2: see distributed.py
"""

from __future__ import annotations

# specs and recipes
from .specs import ElementFormat, GemmKind, Granularity, QuantSpec, Rounding, Scheme, TensorRole, Transform
from .recipes import GradInputSpecs, GradWeightSpecs, OutputSpecs, Recipe, recipe, recipes
from .config import FQTConfig, Fusion, Inference, Mode
from .rules import Rule, RuleError, SiteInfo, keep_first_and_last, skip_small
from .quantizers import register_quantizer, registered_quantizers, unregister_quantizer
from .errors import FQTError, OptionsError, PassError, QuantizerError, SpecError, UnsupportedGraphError

# reference numerics
from .reference import quantize
from . import ops as _ops  # registers the fqt:: custom ops

# backend and inspection
from .backend import FQTBackend, backend, fqt_backend, last_compiles
from .explain import explain
from .report import ExplainReport
from .coverage import Coverage, CoverageWarning
from .distributed import compile_sharded, sharded_modules
from .sites import GemmStatus

# live monitoring
from .monitor import Monitor, MonitorWarning, Thresholds
from .monitor_policy import AdaptivePolicy
from .monitor_sinks import JsonLinesSink, TensorBoardSink

__all__ = [
    # specs and recipes
    "QuantSpec", "ElementFormat", "Granularity", "Scheme", "Rounding", "Transform", "TensorRole", "GemmKind",
    "Recipe", "OutputSpecs", "GradInputSpecs", "GradWeightSpecs", "recipe", "recipes",
    "FQTConfig", "Mode", "Fusion", "Inference",
    # placement rules
    "Rule", "SiteInfo", "keep_first_and_last", "skip_small",
    # numerics
    "quantize", "register_quantizer", "registered_quantizers", "unregister_quantizer",
    # backend and inspection
    "backend", "fqt_backend", "FQTBackend", "explain", "ExplainReport", "GemmStatus", "last_compiles", "Coverage",
    "CoverageWarning",
    "compile_sharded", "sharded_modules",
    # live monitoring
    "Monitor", "Thresholds", "AdaptivePolicy", "MonitorWarning", "JsonLinesSink", "TensorBoardSink",
    # errors
    "FQTError", "SpecError", "OptionsError", "UnsupportedGraphError", "PassError", "RuleError", "QuantizerError",
]

del _ops
