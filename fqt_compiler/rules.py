"""Placement rules: which GEMMs get which specs, beyond the recipe.

Rules are evaluated in order for every GEMM of every site; **the first rule that matches
decides** that GEMM, and a GEMM no rule matches follows the recipe. A rule matches when all of
its given matchers match (a rule with no matcher matches everything):

* ``op``: aten op name(s) of the forward GEMM, e.g. ``"addmm"``, ``("mm", "addmm")``, ``"convolution"``;
* ``gemm``: GEMM kind(s): ``"output"``, ``"grad_input"``, ``"grad_weight"`` (``grad_lhs`` / ``grad_rhs``);
* ``module``: the module path, a glob (``"blocks.*.attn.*"``) or a regex (``"re:^head$"``);
* ``min_dim`` / ``max_dim``: bounds on the smallest of the forward GEMM's M, K, N;
* ``where``: any callable taking a :class:`SiteInfo` and returning a bool.

Exactly one action: ``recipe`` (a name or Recipe: its specs for this GEMM), ``specs`` (a dict
``{"grad_input.grad_output": QuantSpec, "output.weight": None, ...}``; roles not named follow
the recipe), or ``high_precision="reason"`` (the GEMM is kept in high precision and the table
says why). A forward operand's spec is the one its ``output`` GEMM gets; backward GEMMs reuse
or re-quantize it as described in ``recipes.py``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .errors import FQTError, SpecError
from .recipes import Recipe, recipe as recipe_by_name
from .specs import GemmKind, QuantSpec, TensorRole

__all__ = ["Rule", "RuleError", "SiteInfo", "keep_first_and_last", "skip_small"]


class RuleError(FQTError):
    """A user rule raised while deciding a GEMM; names the rule and the node."""


@dataclass(frozen=True)
class SiteInfo:
    """What a rule sees about one GEMM site."""

    module_path: str
    op: str  # aten op name of the forward GEMM, without the "aten." prefix
    node: str  # the forward GEMM's node in the joint graph
    dims: tuple  # (M, K, N) of the forward GEMM ((N*Ho*Wo, C*kh*kw, O) for a convolution)
    flops: int
    index: int  # position among this graph's forward GEMM sites, in graph order
    count: int  # number of forward GEMM sites in this graph


def _as_tuple(value: object) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, GemmKind)):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class Rule:
    """One placement rule (see the module docstring). Frozen; validated on construction."""

    name: str
    op: str | tuple[str, ...] | None = None
    gemm: str | GemmKind | tuple | None = None
    module: str | None = None
    min_dim: int | None = None
    max_dim: int | None = None
    where: Callable[[SiteInfo], bool] | None = None
    recipe: str | Recipe | None = None
    specs: dict | None = None
    high_precision: str | None = None
    _gemms: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)
    _specs: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError("Rule.name must be a non-empty string (it names the rule in tables and errors)")
        actions = [a for a in ("recipe", "specs", "high_precision") if getattr(self, a) is not None]
        if len(actions) != 1:
            raise SpecError(
                f"rule {self.name!r}: give exactly one action of recipe / specs / high_precision, got {actions or 'none'}"
            )
        kinds = set()
        for g in _as_tuple(self.gemm):
            try:
                kinds.add(g if isinstance(g, GemmKind) else GemmKind(g))
            except ValueError:
                raise SpecError(f"rule {self.name!r}: gemm={g!r}; use one of {[k.value for k in GemmKind]}") from None
        object.__setattr__(self, "_gemms", frozenset(kinds))  # parsed once, at construction
        if self.recipe is not None:
            object.__setattr__(self, "recipe", recipe_by_name(self.recipe))
        if self.specs is not None:
            parsed = []
            for key, spec in dict(self.specs).items():
                gemm_name, _, role_name = str(key).partition(".")
                try:
                    pair = (GemmKind(gemm_name), TensorRole(role_name))
                except ValueError:
                    raise SpecError(
                        f"rule {self.name!r}: specs key {key!r}; "
                        "use 'gemm.role' such as 'grad_input.grad_output' or 'output.weight'"
                    ) from None
                if spec is not None and not isinstance(spec, QuantSpec):
                    raise SpecError(f"rule {self.name!r}: specs[{key!r}] must be a QuantSpec or None")
                parsed.append((pair, spec))
            object.__setattr__(self, "_specs", tuple(parsed))
        if self.high_precision is not None and not str(self.high_precision).strip():
            raise SpecError(f"rule {self.name!r}: high_precision needs a reason, e.g. high_precision='first layer'")
        if self.where is not None and not callable(self.where):
            raise SpecError(f"rule {self.name!r}: where must be callable")
        self._check_matchers()

    def _check_matchers(self) -> None:
        """Types and patterns, at construction: a bad regex fails here, naming the rule, not
        later inside a compile."""
        if self.module is not None:
            if not isinstance(self.module, str):
                raise SpecError(f"rule {self.name!r}: module must be a glob or 're:<regex>' string, got {self.module!r}")
            if self.module.startswith("re:"):
                try:
                    re.compile(self.module[3:])
                except re.error as exc:
                    raise SpecError(f"rule {self.name!r}: module={self.module!r} is not a valid regex ({exc})") from None
        if not all(isinstance(o, str) for o in _as_tuple(self.op)):
            raise SpecError(f"rule {self.name!r}: op must be an aten op name or a tuple of them, got {self.op!r}")
        for bound in ("min_dim", "max_dim"):
            value = getattr(self, bound)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise SpecError(f"rule {self.name!r}: {bound} must be a non-negative int, got {value!r}")
        if self.min_dim is not None and self.max_dim is not None and self.min_dim > self.max_dim:
            raise SpecError(f"rule {self.name!r}: min_dim={self.min_dim} > max_dim={self.max_dim} matches nothing")

    # ------------------------------------------------------------------ matching
    def matches(self, site: SiteInfo, kind: GemmKind) -> bool:
        if self._gemms and kind not in self._gemms:
            return False
        if self.op is not None and site.op not in _as_tuple(self.op):
            return False
        if self.module is not None and not _module_matches(self.module, site.module_path):
            return False
        small = _smallest(site.dims)
        if self.min_dim is not None and (small is None or small < self.min_dim):
            return False
        if self.max_dim is not None and (small is None or small > self.max_dim):
            return False
        if self.where is not None:
            try:
                return bool(self.where(site))
            except Exception as exc:
                raise RuleError(
                    f"rule {self.name!r} raised {type(exc).__name__}: {exc} while looking at node {site.node} "
                    f"({site.op} in module {site.module_path!r})"
                ) from exc
        return True

    def spec(self, kind: GemmKind, role: TensorRole, fallback: Recipe) -> QuantSpec | None:
        """The spec this rule gives ``role`` in ``kind`` (high precision: None)."""
        if self.high_precision is not None:
            return None
        if self.recipe is not None:
            return self.recipe.spec(kind, role)
        lookup_kind = {GemmKind.GRAD_LHS: GemmKind.GRAD_INPUT, GemmKind.GRAD_RHS: GemmKind.GRAD_WEIGHT}.get(kind, kind)
        for (k, r), spec in self._specs:
            if k is lookup_kind and r is role:
                return spec
        return fallback.spec(kind, role)

    def key(self) -> str:
        """Text identity (for reports and cache keys); callables by qualified name and a hash
        of their source (two different lambdas are two different rules)."""
        where = None
        if self.where is not None:
            import hashlib
            import inspect

            try:
                text = inspect.getsource(self.where)
            except (OSError, TypeError):
                text = ""
            where = f"{getattr(self.where, '__qualname__', repr(self.where))}#{hashlib.sha256(text.encode()).hexdigest()[:8]}"
        action = (
            f"recipe={self.recipe.name}" if self.recipe is not None
            else f"specs={[(k.value + '.' + r.value, s.key() if s else None) for (k, r), s in self._specs]}"
            if self.specs is not None else f"high_precision={self.high_precision!r}"
        )
        return (
            f"Rule({self.name}, op={self.op}, gemm={sorted(g.value for g in self._gemms)}, module={self.module}, "
            f"min_dim={self.min_dim}, max_dim={self.max_dim}, where={where}, {action})"
        )


def _smallest(dims: tuple) -> int | None:
    static = [d for d in dims if isinstance(d, int)]
    return min(static) if static and len(static) == len(dims) else None


def _module_matches(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def first_matching(rules: Iterable[Rule], site: SiteInfo, kind: GemmKind) -> Rule | None:
    for rule in rules:
        if rule.matches(site, kind):
            return rule
    return None


# --------------------------------------------------------------------------- helpers
def keep_first_and_last(reason: str = "first / last layer kept in high precision") -> Rule:
    """Keep the first and the last GEMM site of each compiled graph in high precision (the
    usual practice for the stem and the classifier). A graph break starts a new graph."""
    return Rule(name="keep-first-and-last", where=lambda s: s.index == 0 or s.index == s.count - 1, high_precision=reason)


def skip_small(min_dim: int = 128, reason: str | None = None) -> Rule:
    """Keep GEMMs whose smallest dimension is below ``min_dim`` in high precision: too small
    for a low-bit GEMM to win over the quantization passes."""
    return Rule(
        name="skip-small",
        max_dim=min_dim - 1,
        high_precision=reason or f"smallest GEMM dim < {min_dim}: too small to gain",
    )
