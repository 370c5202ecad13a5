"""QuantSpec validation and text forms; the built-in recipes against docs/quantizers.md §2 and recipes.py."""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch

import fqt_compiler as fqt
from fqt_compiler import (
    ElementFormat,
    GemmKind,
    Granularity,
    QuantSpec,
    Rounding,
    Scheme,
    SpecError,
    TensorRole,
    Transform,
)

# --------------------------------------------------------------------------- validation
INVALID_SPECS = [
    pytest.param(dict(bits=1), "bits", id="int-bits-1"),
    pytest.param(dict(bits=9), "bits", id="int-bits-9"),
    pytest.param(dict(format="uint", scheme="asym", bits=1), "bits", id="uint-bits-1"),
    pytest.param(dict(format="uint", scheme="asym", bits=9), "bits", id="uint-bits-9"),
    pytest.param(dict(bits=True), "bits", id="bits-bool"),
    pytest.param(dict(bits=8.0), "bits", id="bits-float"),
    pytest.param(dict(granularity="block", block_size=0), "block_size", id="block-size-0"),
    pytest.param(dict(granularity="block", block_size=-4), "block_size", id="block-size-negative"),
    pytest.param(dict(granularity="block"), "block_size", id="block-size-missing"),
    pytest.param(dict(granularity="block", block_size=32.0), "block_size", id="block-size-float"),
    pytest.param(dict(granularity="row", block_size=32), "block_size", id="block-size-for-row"),
    pytest.param(dict(granularity="tensor", block_size=32), "block_size", id="block-size-for-tensor"),
    pytest.param(dict(format="fp8_e4m3", scheme="asym"), "scheme", id="e4m3-asym"),
    pytest.param(dict(format="fp8_e4m3", scheme="zog"), "scheme", id="e4m3-zog"),
    pytest.param(dict(format="fp8_e5m2", scheme="asym"), "scheme", id="e5m2-asym"),
    pytest.param(dict(format="fp8_e5m2", scheme="zog"), "scheme", id="e5m2-zog"),
    pytest.param(dict(format="fp8_e4m3", bits=4), "bits", id="e4m3-bits-4"),
    pytest.param(dict(format="fp8_e5m2", bits=16), "bits", id="e5m2-bits-16"),
    pytest.param(dict(format="uint", scheme="sym"), "scheme", id="uint-sym"),
    pytest.param(dict(format="uint"), "scheme", id="uint-default-scheme-is-sym"),
    pytest.param(dict(transform="bhq"), "transform", id="bhq-per-tensor"),
    pytest.param(dict(transform="bhq", granularity="column"), "transform", id="bhq-per-column"),
    pytest.param(dict(transform="bhq", granularity="block", block_size=16), "transform", id="bhq-per-block"),
    pytest.param(dict(format="int4"), "format", id="bad-format"),
    pytest.param(dict(granularity="rows"), "granularity", id="bad-granularity"),
    pytest.param(dict(scheme="symmetric-ish"), "scheme", id="bad-scheme"),
    pytest.param(dict(rounding="stoch"), "rounding", id="bad-rounding"),
    pytest.param(dict(transform="hadamard"), "transform", id="bad-transform"),
    pytest.param(dict(granularity=3), "granularity", id="granularity-not-a-string"),
]


@pytest.mark.parametrize(("kwargs", "field"), INVALID_SPECS)
def test_spec_invalid_raises_spec_error_naming_field(kwargs, field):
    with pytest.raises(SpecError) as info:
        QuantSpec(**kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, fqt.FQTError)
    assert re.search(rf"\b{field}\b", str(info.value)), f"message does not name {field!r}: {info.value}"


@pytest.mark.parametrize("field", ["format", "granularity", "scheme", "rounding", "transform"])
def test_spec_bad_enum_message_lists_valid_values(field):
    with pytest.raises(SpecError) as info:
        QuantSpec(**{field: "definitely-not-valid"})
    msg = str(info.value)
    members = {
        "format": ElementFormat,
        "granularity": Granularity,
        "scheme": Scheme,
        "rounding": Rounding,
        "transform": Transform,
    }[field]
    assert f"QuantSpec.{field}" in msg
    for member in members:
        assert repr(member.value) in msg, f"{member.value!r} missing from: {msg}"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param(dict(granularity="row"), dict(granularity=Granularity.ROW), id="value-string"),
        pytest.param(dict(granularity="ROW"), dict(granularity=Granularity.ROW), id="upper-case"),
        pytest.param(dict(scheme="zero_on_grid", format="uint"), dict(scheme=Scheme.ZERO_ON_GRID), id="member-name"),
        pytest.param(dict(rounding="stochastic"), dict(rounding=Rounding.STOCHASTIC), id="rounding"),
        pytest.param(dict(format="fp8_e5m2"), dict(format=ElementFormat.FP8_E5M2, bits=8), id="fp8-default-bits"),
        pytest.param(
            dict(transform="bhq", granularity="row", format="uint", scheme="asym"),
            dict(transform=Transform.BLOCK_HOUSEHOLDER),
            id="bhq-row",
        ),
    ],
)
def test_spec_strings_are_parsed_to_enums(kwargs, expected):
    spec = QuantSpec(**kwargs)
    for name, value in expected.items():
        assert getattr(spec, name) == value
        assert type(getattr(spec, name)) is type(value)


def test_spec_is_frozen_and_with_revalidates():
    spec = QuantSpec(format="uint", scheme="asym", bits=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 5  # type: ignore[misc]
    assert spec.with_(bits=5).bits == 5 and spec.bits == 4
    with pytest.raises(SpecError, match="bits"):
        spec.with_(bits=9)
    with pytest.raises(SpecError, match="scheme"):
        spec.with_(scheme="sym")


@pytest.mark.parametrize(
    ("spec", "levels", "qmax", "offset", "dtype"),
    [
        pytest.param(QuantSpec(bits=8), 255, 127.0, 0, torch.int8, id="int8-sym"),
        pytest.param(QuantSpec(bits=4), 15, 7.0, 0, torch.int8, id="int4-sym"),
        pytest.param(QuantSpec(bits=4, scheme="asym"), 15, 7.0, -8, torch.int8, id="int4-asym"),
        pytest.param(QuantSpec(bits=2, scheme="zog"), 3, 1.0, -2, torch.int8, id="int2-zog"),
        pytest.param(QuantSpec(bits=5, format="uint", scheme="asym"), 31, 15.0, 0, torch.uint8, id="uint5-asym"),
        pytest.param(QuantSpec(format="fp8_e4m3"), 255, 448.0, 0, torch.float8_e4m3fn, id="e4m3"),
        pytest.param(QuantSpec(format="fp8_e5m2"), 255, 57344.0, 0, torch.float8_e5m2, id="e5m2"),
    ],
)
def test_spec_derived_numbers(spec, levels, qmax, offset, dtype):
    assert spec.levels == levels
    assert spec.qmax == qmax
    assert spec.code_offset == offset
    assert spec.code_dtype == dtype


# --------------------------------------------------------------------------- key round trip
def _all_valid_specs() -> list[QuantSpec]:
    out = []
    for fmt, bits, gran, scheme, rounding, transform in itertools.product(
        ["int", "uint", "fp8_e4m3", "fp8_e5m2"],
        [2, 3, 4, 5, 6, 7, 8],
        ["tensor", "row", "column", "block"],
        ["sym", "asym", "zog"],
        ["nearest", "stochastic"],
        ["none", "bhq"],
    ):
        for block in [1, 32, 128] if gran == "block" else [None]:
            try:
                out.append(
                    QuantSpec(
                        format=fmt,
                        bits=bits,
                        granularity=gran,
                        block_size=block,
                        scheme=scheme,
                        rounding=rounding,
                        transform=transform,
                    )
                )
            except SpecError:
                pass
    return out


ALL_VALID_SPECS = _all_valid_specs()


def test_key_round_trip_for_every_valid_spec():
    assert len(ALL_VALID_SPECS) > 500  # the enumeration really covers the space
    for spec in ALL_VALID_SPECS:
        key = spec.key()
        assert isinstance(key, str) and key.count("/") == 4
        assert QuantSpec.from_key(key) == spec, key


def test_keys_are_unique():
    keys = [s.key() for s in ALL_VALID_SPECS]
    assert len(set(keys)) == len(keys)
    assert len(set(ALL_VALID_SPECS)) == len(ALL_VALID_SPECS)


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        pytest.param(QuantSpec(), "int8/sym/tensor/nearest/none", id="default"),
        pytest.param(
            QuantSpec(format="uint", bits=5, scheme="asym", granularity="row", rounding="stochastic", transform="bhq"),
            "uint5/asym/row/stochastic/bhq",
            id="bhq5",
        ),
        pytest.param(
            QuantSpec(format="fp8_e4m3", granularity="block", block_size=32), "fp8_e4m3/sym/block32/nearest/none", id="fp8-block"
        ),
    ],
)
def test_key_text(spec, key):
    assert spec.key() == key
    assert QuantSpec.from_key(key) == spec


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("int8/sym/row", id="too-few-parts"),
        pytest.param("int8/sym/row/nearest/none/extra", id="too-many-parts"),
        pytest.param("int9/sym/row/nearest/none", id="bits-9"),
        pytest.param("float8/sym/row/nearest/none", id="bad-format"),
        pytest.param("uint8/sym/row/nearest/none", id="uint-sym"),
        pytest.param("int8/sym/rows/nearest/none", id="bad-granularity"),
        # A key is user-visible text (op arguments, logs); malformed numbers must still be SpecErrors.
        pytest.param("int/sym/row/nearest/none", id="format-without-bits"),
        pytest.param("int8/sym/blockX/nearest/none", id="block-size-not-a-number"),
    ],
)
def test_from_key_rejects_malformed_keys_with_spec_error(key):
    with pytest.raises(SpecError):
        QuantSpec.from_key(key)


# --------------------------------------------------------------------------- recipes
PAPER_FAMILIES = ["ptq", "psq", "bhq"]
PAPER_BITS = [4, 5, 6, 7, 8]


def test_recipes_contains_the_built_ins():
    names = fqt.recipes()
    assert isinstance(names, list)
    expected = {"exact", "qat", "int8"} | {f"{fam}{b}" for fam in PAPER_FAMILIES for b in PAPER_BITS}
    missing = expected - set(names)
    assert not missing, f"missing recipes: {sorted(missing)}"
    assert len(names) == len(set(names))
    for name in names:
        r = fqt.recipe(name)
        assert isinstance(r, fqt.Recipe) and r.name == name


def test_recipe_unknown_name_lists_valid_names():
    with pytest.raises(SpecError) as info:
        fqt.recipe("nope")
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "nope" in msg
    for name in fqt.recipes():
        assert name in msg, f"{name} not listed in: {msg}"


def test_recipe_lookup_is_case_insensitive_and_passes_recipes_through():
    assert fqt.recipe("PSQ5") is fqt.recipe("psq5")
    r = fqt.recipe("bhq4")
    assert fqt.recipe(r) is r
    with pytest.raises(SpecError):
        fqt.recipe(5)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="psq"):
        fqt.recipe("psq9")  # close match hint and / or listing


def _assert_paper_forward(r: fqt.Recipe) -> None:
    act, w = r.output.activation, r.output.weight
    for spec in (act, w):
        assert spec is not None
        assert spec.bits == 8 and spec.granularity is Granularity.TENSOR
        assert spec.rounding is Rounding.NEAREST and spec.transform is Transform.NONE
        assert not spec.format.is_float
    assert act.scheme is Scheme.ASYMMETRIC
    assert w.scheme is Scheme.ZERO_ON_GRID
    # the backward GEMMs reuse the forward's quantized operands (STE)
    assert r.grad_input.weight == w
    assert r.grad_weight.activation == act


def test_recipe_exact_quantizes_nothing():
    r = fqt.recipe("exact")
    for gemm in GemmKind:
        for role in TensorRole:
            assert r.spec(gemm, role) is None


def test_recipe_qat_forward_only():
    r = fqt.recipe("qat")
    _assert_paper_forward(r)
    assert r.grad_input.grad_output is None
    assert r.grad_weight.grad_output is None
    assert r.output.activation is not None and r.output.weight is not None


def _grad_common(spec: QuantSpec, bits: int) -> None:
    assert spec is not None
    assert spec.bits == bits
    assert spec.rounding is Rounding.STOCHASTIC
    assert not spec.format.is_float


@pytest.mark.parametrize("bits", PAPER_BITS, ids=lambda b: f"b{b}")
def test_recipe_ptq(bits):
    r = fqt.recipe(f"ptq{bits}")
    _assert_paper_forward(r)
    for spec in (r.grad_input.grad_output, r.grad_weight.grad_output):
        _grad_common(spec, bits)
        assert spec.granularity is Granularity.TENSOR
        assert spec.scheme is Scheme.ZERO_ON_GRID
        assert spec.transform is Transform.NONE


@pytest.mark.parametrize("bits", PAPER_BITS, ids=lambda b: f"b{b}")
def test_recipe_psq(bits):
    r = fqt.recipe(f"psq{bits}")
    _assert_paper_forward(r)
    gi, gw = r.grad_input.grad_output, r.grad_weight.grad_output
    _grad_common(gi, bits)
    _grad_common(gw, bits)
    assert gi.granularity is Granularity.ROW and gi.scheme is Scheme.ASYMMETRIC
    assert gw.granularity is Granularity.COLUMN and gw.scheme is Scheme.ASYMMETRIC
    assert gi.transform is Transform.NONE and gw.transform is Transform.NONE


@pytest.mark.parametrize("bits", PAPER_BITS, ids=lambda b: f"b{b}")
def test_recipe_bhq(bits):
    r = fqt.recipe(f"bhq{bits}")
    _assert_paper_forward(r)
    gi, gw = r.grad_input.grad_output, r.grad_weight.grad_output
    _grad_common(gi, bits)
    _grad_common(gw, bits)
    assert gi.transform is Transform.BLOCK_HOUSEHOLDER
    assert gi.granularity is Granularity.ROW and gi.scheme is Scheme.ASYMMETRIC
    assert gw.transform is Transform.NONE
    assert gw.granularity is Granularity.COLUMN and gw.scheme is Scheme.ASYMMETRIC


@pytest.mark.parametrize("bits", PAPER_BITS, ids=lambda b: f"b{b}")
def test_recipe_paper_families_share_forward(bits):
    qat = fqt.recipe("qat")
    for fam in PAPER_FAMILIES:
        assert fqt.recipe(f"{fam}{bits}").output == qat.output


def test_recipe_int8_layouts():
    r = fqt.recipe("int8")
    S = Granularity

    def check(spec, gran, rounding):
        assert spec is not None
        assert spec.format is ElementFormat.INT and spec.bits == 8 and spec.scheme is Scheme.SYMMETRIC
        assert spec.granularity is gran and spec.rounding is rounding and spec.transform is Transform.NONE

    check(r.output.activation, S.ROW, Rounding.NEAREST)  # per token / sample
    check(r.output.weight, S.ROW, Rounding.NEAREST)  # per out channel
    check(r.grad_input.grad_output, S.ROW, Rounding.STOCHASTIC)
    # per in channel / per channel: a matrix's column, a convolution operand's dim-1 channel
    check(r.grad_input.weight, S.CHANNEL, Rounding.NEAREST)
    check(r.grad_weight.grad_output, S.CHANNEL, Rounding.STOCHASTIC)
    check(r.grad_weight.activation, S.CHANNEL, Rounding.NEAREST)


@pytest.mark.parametrize(
    ("gemm", "role", "path"),
    [
        (GemmKind.OUTPUT, TensorRole.ACTIVATION, ("output", "activation")),
        (GemmKind.OUTPUT, TensorRole.WEIGHT, ("output", "weight")),
        (GemmKind.OUTPUT, TensorRole.GRAD_OUTPUT, None),
        (GemmKind.GRAD_INPUT, TensorRole.GRAD_OUTPUT, ("grad_input", "grad_output")),
        (GemmKind.GRAD_INPUT, TensorRole.WEIGHT, ("grad_input", "weight")),
        (GemmKind.GRAD_INPUT, TensorRole.ACTIVATION, None),
        (GemmKind.GRAD_WEIGHT, TensorRole.GRAD_OUTPUT, ("grad_weight", "grad_output")),
        (GemmKind.GRAD_WEIGHT, TensorRole.ACTIVATION, ("grad_weight", "activation")),
        (GemmKind.GRAD_LHS, TensorRole.GRAD_OUTPUT, ("grad_input", "grad_output")),
        (GemmKind.GRAD_RHS, TensorRole.GRAD_OUTPUT, ("grad_weight", "grad_output")),
    ],
    ids=lambda v: v.value if hasattr(v, "value") else None,
)
def test_recipe_spec_lookup(gemm, role, path):
    r = fqt.recipe("int8")  # every operand differs in int8, so a wrong mapping is visible
    got = r.spec(gemm, role)
    if path is None:
        assert got is None
    else:
        assert got is getattr(getattr(r, path[0]), path[1])


def test_recipe_validation():
    bhq = fqt.recipe("bhq5").grad_input.grad_output
    with pytest.raises(SpecError, match="output"):
        fqt.Recipe(name="bad", output=fqt.OutputSpecs(activation=bhq))
    with pytest.raises(SpecError, match="name"):
        fqt.Recipe(name="")
    with pytest.raises(SpecError, match="grad_input.grad_output"):
        fqt.GradInputSpecs(grad_output="int8")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="output"):
        fqt.Recipe(name="bad", output=fqt.GradInputSpecs())  # type: ignore[arg-type]
