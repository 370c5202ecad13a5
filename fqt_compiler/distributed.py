"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support.

``torch.compile(sharded_model, backend="fqt")`` compiles *nothing* of a model whose modules
were ``fully_shard``-ed: FSDP2 runs its all-gather / reduce-scatter hooks under
``torch._dynamo.disable``, so Dynamo breaks the graph at every sharded module's call and never
reaches the GEMMs inside; the model would train in full precision without a word. (DDP is not
affected: ``torch.compile(DistributedDataParallel(model), backend="fqt")`` works as usual.)

The supported way is to compile the ``forward`` of every sharded module, not its ``__call__``:
FSDP2's hooks then run eagerly around each compiled forward (parameters unsharded before it,
gradients reduce-scattered after its backward), and each forward's GEMMs go through the fqt
passes like any other graph::

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    fqt.compile_sharded(model, recipe="int8")  # instead of torch.compile(model, ...)

``explain`` refuses a sharded model with the same advice (explain the unsharded model).
"""

from __future__ import annotations

from typing import Any

import torch

from .backend import FQTBackend, backend
from .errors import FQTError

__all__ = ["compile_sharded", "sharded_modules"]


def sharded_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` (itself included) that ``fully_shard`` has wrapped."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def compile_sharded(
    model: torch.nn.Module, recipe: Any = None, *, fqt_backend: FQTBackend | None = None, **options: Any
) -> FQTBackend:
    """Compile the ``forward`` of every ``fully_shard``-ed module of ``model`` with the fqt
    backend (``recipe`` and ``options`` as for :func:`fqt_compiler.backend`, or a ready
    ``fqt_backend``) and return the backend, whose ``records`` list the compiled graphs.

    Raises :class:`FQTError` if no module of ``model`` is sharded (use ``torch.compile(model,
    backend="fqt")`` then) or if a forward was already replaced by a compiled one.
    """
    targets = sharded_modules(model)
    if not targets:
        raise FQTError(
            f"compile_sharded: no module of {type(model).__name__} is fully_shard-ed; call fully_shard first, "
            'or use torch.compile(model, backend="fqt") for an unsharded (or DDP) model'
        )
    if fqt_backend is not None and (recipe is not None or options):
        raise FQTError("compile_sharded: give either fqt_backend or recipe/options, not both")
    be = fqt_backend if fqt_backend is not None else backend(recipe, **options)
    sharded = set(targets)
    for module in _compile_targets(model, sharded):
        if "forward" in vars(module):  # an instance attribute: someone replaced forward already
            raise FQTError(
                f"compile_sharded: {type(module).__name__}.forward is already replaced on the instance "
                "(compiled twice?); call compile_sharded once, on a model whose forwards are the class's"
            )
        # the forward only: FSDP2's hooks around __call__ stay eager (Dynamo must not see them)
        module.forward = torch.compile(module.forward, backend=be)
    _warn_uncovered(model, sharded)
    return be


def _has_sharded_below(module: torch.nn.Module, sharded: set) -> bool:
    return any(m in sharded for m in module.modules() if m is not module)


def _compile_targets(model: torch.nn.Module, sharded: set) -> list[torch.nn.Module]:
    """The largest submodules whose forward can be compiled whole: no sharded module below them.

    A module with sharded modules below it is not compiled itself: Dynamo would break its graph
    at every sharded child's call (and gives up on a frame that breaks inside a loop), so its
    own GEMMs would silently stay in high precision. Its sharded-free children are compiled
    instead (a transformer's blocks each, and the root's head on its own)."""
    out: list[torch.nn.Module] = []

    def visit(m: torch.nn.Module) -> None:
        if not _has_sharded_below(m, sharded):
            if m in sharded or any(True for _ in m.parameters()):
                out.append(m)
            return
        for child in m.children():
            visit(child)

    visit(model)
    return out


def _warn_uncovered(model: torch.nn.Module, sharded: set) -> None:
    """Parameters held directly by a module whose forward is not compiled (it has sharded
    modules below it) are used by eager code: a GEMM on them stays in high precision."""
    import warnings

    for name, m in model.named_modules():
        if _has_sharded_below(m, sharded):
            direct = [n for n, _ in m.named_parameters(recurse=False)]
            if direct:
                warnings.warn(
                    f"compile_sharded: {name or type(m).__name__} holds parameters {direct} directly and has sharded "
                    "modules below it, so its own forward runs eagerly: a GEMM on these parameters is not quantized. "
                    "Move them into a submodule (e.g. an nn.Linear) to have them compiled",
                    stacklevel=3,
                )
