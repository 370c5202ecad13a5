"""A roofline cost model for one GEMM site: low-bit (GEMMs + quantization traffic) against high
precision, used by ``never_slower=True`` to keep in high precision the sites that cannot win.

Model (docs/benchmarks.md): a GEMM takes ``max(2MKN / (efficiency x peak), bytes /
bandwidth)``. A quantization moves ``elements x (input bytes + 1)`` at the device's quantize
bandwidth, plus one more read for a per-tensor scale (its min / max pass) and ``bhq_passes``
for BHQ (grouping, transform; its inverse on the output rows). A GEMM that no low-bit kernel can
run (block scales, fp8 on CPU, convolutions where no low-bit convolution exists) is simulated: its high-precision
time plus the quantization. A site stays low-bit when ``margin x low-bit time < high-precision
time``; the margin covers what a roofline leaves out (launches, small-kernel inefficiency).

The profiles say where their numbers come from: the H100 one is the datasheet roofline (its
quantize bandwidth is an assumption until measured there), replaced on a GPU by the profile
``fqt gpu-check`` measured on a device of the same name, and on a CPU by the one ``fqt
calibrate`` measured on this CPU model and thread count (``measured.py``), once they exist.
On a CPU with bf16 units the high-precision time of an fp32 site is the faster of fp32 and
bf16 (``bf16_flops``): ``never_slower`` then promises not to lose to bf16 autocast either. On
a GPU the GEMMs themselves are measured, the bf16 GEMM beside the fastest low-bit provider
(``set_gemm_timer``: ``codegen/providers.py``), and only the quantization is modelled. The CPU
default was measured on a 2-core AVX-512 VNNI EPYC with ``fqt bench`` (GEMM throughputs) and
``tools/bench.py``'s quantize section (bandwidth, BHQ passes); on a CPU without int8
dot-product instructions, where fqt's int8 GEMM runs on fp32 units (``int8_gemm.py``), the
default is the one ``fqt calibrate`` measured on a 2-core AVX2 EPYC. Other CPUs should run
``fqt calibrate``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .int8_gemm import INT_MM, int8_gemm_provider
from .measured import cpu_name, fields_from_gpu_check, measured_fields
from .specs import ElementFormat, GemmKind, Granularity, QuantSpec, Transform

__all__ = [
    "DeviceProfile", "SiteCost", "Slot", "H100", "CPU_EPYC_2CORE", "CPU_AVX2_2CORE", "default_profile", "profile_for",
    "set_profile", "site_cost",
    "profile_from_gpu_check", "set_gemm_timer",
]


class Slot(enum.Enum):
    """Which tensor of a site a spec in :func:`site_cost`'s ``specs`` quantizes."""

    LHS = "lhs"  # the forward GEMM's left operand (the activation of a Linear)
    RHS = "rhs"  # the forward GEMM's right operand (the weight of a Linear)
    GRAD = "grad"  # grad_output, as one backward GEMM reads it


@dataclass(frozen=True)
class DeviceProfile:
    """Throughputs the roofline needs, and where they come from."""

    name: str
    hp_flops: float  # high-precision GEMM FLOP/s (bf16 on GPUs, fp32 on CPUs)
    lowbit_flops: float  # int8 / fp8 GEMM op/s
    mem_bw: float  # bytes/s for GEMM operands
    quant_bw: float  # bytes moved per second by a standalone quantize kernel
    efficiency: float = 1.0  # fraction of the peaks a GEMM reaches (1.0 for measured throughputs)
    bhq_passes: float = 3.0  # BHQ quantize cost in units of a plain quantize of the same tensor
    margin: float = 1.15  # low-bit must beat high precision by this factor
    fp8_gemm: bool = True  # has an fp8 GEMM (no fast one on CPUs)
    source: str = ""
    # CPUs: bf16 GEMM FLOP/s where the CPU has bf16 units (AVX-512 BF16, AMX), 0 where it has
    # none or it was not measured. An fp32 site's high-precision time is then the faster of
    # fp32 and bf16 (bf16 autocast is what a user picks instead of fp32 there), and a bf16 site's
    # is bf16's. GPU profiles leave it 0: their hp_flops are bf16 already.
    bf16_flops: float = 0.0


H100 = DeviceProfile(
    "H100 SXM (datasheet roofline)", hp_flops=989e12, lowbit_flops=1979e12, mem_bw=3.35e12, quant_bw=3.35e12,
    efficiency=0.78, source="datasheet peaks; quantize at HBM bandwidth is assumed, not yet measured",
)
CPU_EPYC_2CORE = DeviceProfile(
    "CPU, 2-core AVX-512 VNNI EPYC (measured)", hp_flops=0.195e12, lowbit_flops=0.70e12, mem_bw=36e9, quant_bw=4.4e9,
    bhq_passes=3.0, fp8_gemm=False,
    source="fp32 / int8 GEMM TFLOPS and copy bandwidth from `fqt bench --sections gemm quantize`; stochastic "
    "row-quantize 3.9-4.4 GB/s moved and BHQ = 2.8-3.4 row quantizes at 512-2048 square, measured with Inductor",
)

CPU_AVX2_2CORE = DeviceProfile(
    "CPU, 2-core AVX2 EPYC without VNNI (measured)", hp_flops=0.078e12, lowbit_flops=0.071e12, mem_bw=13.5e9,
    quant_bw=1.43e9, bhq_passes=3.3, fp8_gemm=False,
    source="`fqt calibrate` (2048^3 GEMMs, torch 2.13): no int8 dot-product instructions, so the int8 GEMM is its exact "
    "sums on fp32 units (torch._int_mm measured 25-33x slower than fp32 there); oneDNN's split int8 convolutions measured "
    "0.5-0.8x fp32",
)


def default_profile(device_type: str) -> DeviceProfile:
    """The profile of a device type before any measurement of this machine: the H100 datasheet
    for CUDA; for a CPU the one measured on a CPU like it, with int8 dot-product instructions
    (``torch._int_mm`` is fqt's int8 GEMM there) or without (the int8 GEMM runs on fp32 units)."""
    if device_type != "cpu":
        return H100
    return CPU_EPYC_2CORE if int8_gemm_provider() == INT_MM else CPU_AVX2_2CORE
_CHOSEN: dict[str, DeviceProfile] = {}  # set_profile's


def set_profile(device_type: str, profile: DeviceProfile | None) -> None:
    """Use ``profile`` for every site compiled on ``device_type`` ("cuda" or "cpu"); None goes
    back to the default (a GPU's profile measured by ``fqt gpu-check``, else the datasheet)."""
    if profile is None:
        _CHOSEN.pop(device_type, None)
        return
    if not isinstance(profile, DeviceProfile):
        raise TypeError(f"set_profile needs a DeviceProfile, got {type(profile).__name__}")
    _CHOSEN[device_type] = profile


# Times one GEMM of a site on the device, measured: (bf16 seconds, fastest low-bit provider's
# seconds) for (shape, A spec, B spec, device), or None. The GEMM providers of the codegen stage
# register it (``set_gemm_timer``); the core cannot import them.
_GEMM_TIMER = None


def set_gemm_timer(timer) -> None:
    """Let ``never_slower`` on a GPU compare GEMMs by measurement instead of the roofline:
    ``timer(shape, a_spec, b_spec, device) -> (bf16 seconds, low-bit seconds) | None``."""
    global _GEMM_TIMER
    _GEMM_TIMER = timer


def profile_from_gpu_check(source) -> DeviceProfile:
    """The profile measured by an ``fqt gpu-check`` run (its ``gpu_check.json`` or the parsed
    document); ``set_profile("cuda", profile_from_gpu_check(path))`` applies it by hand."""
    return DeviceProfile(**fields_from_gpu_check(source))


def profile_for(device: torch.device) -> DeviceProfile:
    """The profile of ``device``: ``set_profile``'s, else the one measured on a device of that
    name (a GPU: by ``fqt gpu-check``; this CPU: by ``fqt calibrate``), else the default."""
    if device.type in _CHOSEN:
        return _CHOSEN[device.type]
    name = None
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        name = cpu_name()
    fields = measured_fields(name) if name else None
    if fields is not None:
        return DeviceProfile(**fields)
    return default_profile(device.type)


@dataclass(frozen=True)
class SiteCost:
    """Estimated seconds for one site's three GEMMs, both ways, and the verdict."""

    lowbit_s: float
    hp_s: float
    profile: DeviceProfile

    @property
    def wins(self) -> bool:
        return self.profile.margin * self.lowbit_s < self.hp_s

    def reason(self) -> str:
        return (
            f"cost model ({self.profile.name}): low-bit ~{1e6 * self.lowbit_s:.0f} us x margin {self.profile.margin} "
            f">= high precision ~{1e6 * self.hp_s:.0f} us"
        )


def _gemm_s(p: DeviceProfile, m: int, k: int, n: int, flops: float, operand_bytes: float, out_bytes: float) -> float:
    traffic = (m * k + k * n) * operand_bytes + m * n * out_bytes
    return max(2.0 * m * k * n / (p.efficiency * flops), traffic / p.mem_bw)


def _hp_gemm_s(p: DeviceProfile, shape: tuple[int, int, int], hp_bytes: int) -> float:
    """The high-precision GEMM: the graph's dtype, or bf16 where that is faster (see bf16_flops)."""
    if not p.bf16_flops:
        return _gemm_s(p, *shape, p.hp_flops, hp_bytes, hp_bytes)
    bf16 = _gemm_s(p, *shape, p.bf16_flops, 2, 2)
    return bf16 if hp_bytes <= 2 else min(bf16, _gemm_s(p, *shape, p.hp_flops, hp_bytes, hp_bytes))


def _quant_s(p: DeviceProfile, elements: int, in_bytes: float, spec: QuantSpec | None, fused: bool = False) -> float:
    if spec is None:
        return 0.0
    # fused into its producer, a quantizer no longer re-reads a materialized input: it costs its
    # code writes (the producer's pass over memory happens in both paths)
    moved = elements * (1.0 if fused else in_bytes + 1.0)
    if spec.granularity is Granularity.TENSOR:
        moved += elements * in_bytes  # the min / max pass
    if spec.transform is Transform.BLOCK_HOUSEHOLDER:
        moved *= p.bhq_passes
    return moved / p.quant_bw


def _lowerable(p: DeviceProfile, a: QuantSpec | None, b: QuantSpec | None) -> bool:
    for s in (a, b):
        if s is None or s.granularity is Granularity.BLOCK or s.quantizer is not None:
            return False
        if s.format in (ElementFormat.FP8_E4M3, ElementFormat.FP8_E5M2) and not p.fp8_gemm:
            return False
    return True


def site_cost(
    dims: tuple[int, int, int], specs: dict, device: torch.device, hp_bytes: int, *, gemm_kernel: bool = True,
    fused: bool = False, operand_elements: tuple[int, int, int] | None = None,
) -> SiteCost:
    """Estimate a Linear-like site of forward GEMM ``dims = (M, K, N)``.

    ``specs`` maps ``(GemmKind, Slot)`` to the chosen QuantSpec or None: ``output`` reads
    ``LHS`` and ``RHS``, ``grad_input`` reads ``GRAD`` and ``RHS``, ``grad_weight`` reads
    ``LHS`` and ``GRAD``; a missing backward GEMM is left out. ``gemm_kernel``
    False: no low-bit kernel for this op on this device, every GEMM simulated.
    ``fused``: activation and gradient quantizers are fused into their producers (prologue
    fusion on CUDA); weights are always quantized on their own. ``operand_elements``: the
    (activation, weight, grad_output) sizes where they are not the GEMM's operands' (a
    convolution's implicit GEMM reads each activation element once per kernel position, but
    its quantizer reads it once).
    """
    p = profile_for(device)
    m, k, n = dims
    act, weight, grad = operand_elements or (m * k, k * n, m * n)
    hp = lowbit = 0.0
    gemms = {
        GemmKind.OUTPUT: ((m, k, n), (Slot.LHS, Slot.RHS), (act, weight)),
        GemmKind.GRAD_INPUT: ((m, n, k), (Slot.GRAD, Slot.RHS), (grad, weight)),
        GemmKind.GRAD_WEIGHT: ((k, m, n), (Slot.LHS, Slot.GRAD), (act, grad)),
    }
    counted: set = set()  # a forward quantization reused by a backward GEMM is paid once
    timer = _GEMM_TIMER if device.type == "cuda" and torch.cuda.is_available() else None
    for gemm, (shape, roles, sizes) in gemms.items():
        if (gemm, roles[0]) not in specs and (gemm, roles[1]) not in specs:
            continue
        a, b = (specs.get((gemm, r)) for r in roles)
        measured = timer(shape, a, b, device) if timer is not None and gemm_kernel and _lowerable(p, a, b) else None
        t_hp = measured[0] if measured else _hp_gemm_s(p, shape, hp_bytes)
        hp += t_hp
        quant = 0.0
        for role, spec, elements in zip(roles, (a, b), sizes):
            key = (role if role is not Slot.GRAD else gemm, spec)
            if spec is not None and key not in counted:
                counted.add(key)
                quant += _quant_s(p, elements, hp_bytes, spec, fused=fused and role is not Slot.RHS)
        if gemm_kernel and _lowerable(p, a, b):
            t = measured[1] if measured else _gemm_s(p, *shape, p.lowbit_flops, 1.0, hp_bytes)
            if (a is not None and a.transform is Transform.BLOCK_HOUSEHOLDER
                    or b is not None and b.transform is Transform.BLOCK_HOUSEHOLDER):
                t += shape[0] * shape[2] * 2 * hp_bytes * p.bhq_passes / p.quant_bw / 2  # the inverse on the output rows
        else:
            t = t_hp
        lowbit += t + quant
    return SiteCost(lowbit, hp, p)
