"""Markdown tables of one ``fqt gpu-check`` stage's results (``gpu_check.md``)."""

from __future__ import annotations

from tabulate import tabulate

__all__ = ["stage_tables"]


def _table(rows: list, headers: list[str]) -> list[str]:
    return tabulate(rows, headers=headers, tablefmt="github").splitlines() if rows else ["(nothing measured)"]


def _preflight(res: dict) -> list[str]:
    dev = res.get("device", {})
    lines = _table([[k, v] for k, v in dev.items()], ["fact", "value"])
    launch = res.get("triton_launch", {})
    lines += ["", f"One Triton launch: {launch}", f"Peaks: {res.get('peaks', '-')}", ""]
    probes = res.get("probes", {})
    rows = [[name, "ok" if p.get("ok") else "FAILED", p.get("rel_err", p.get("error", ""))] for name, p in probes.items()]
    return lines + _table(rows, ["probe", "result", "rel. error vs float64 / error"])


def _tests(res: dict) -> list[str]:
    runs = res.get("runs", [])
    rows = [[r["run"], r.get("exit"), r.get("tests", "-"), r.get("passed", "-"), r.get("failures", "-"), r.get("errors", "-"),
             r.get("skipped", "-"), r.get("seconds")] for r in runs]
    lines = _table(rows, ["run", "exit", "tests", "passed", "failed", "errors", "skipped", "s"])
    for r in runs:
        for f in r.get("failed", [])[:40]:
            lines.append(f"- FAILED `{f['test']}`: {f['message'][:200]}")
        if "error" in r:
            lines.append(f"- {r['run']} did not report: {r['error'][-300:]}")
    return lines


def _profile(p: dict) -> str:
    if "device_kernels" in p:
        return (
            f"{p['device_kernels']} kernels / {p['host_launch_calls']} launches, "
            f"host {p['host_ms']} ms, device {p['device_ms']} ms"
        )
    return f"{p.get('top_level_ops')} ops, host {p.get('host_ms')} ms"


def _launches(items: list | None) -> str:
    """fqt's compiled code per step: kernels (fqt's), library calls, Python calls."""
    if not items:
        return "-"
    total = {k: sum(i[k] for i in items) for k in ("kernels", "fqt_kernels", "library")}
    python = sum(len(i["python_calls"]) for i in items)
    return f"{total['kernels']} kernels ({total['fqt_kernels']} fqt), {total['library']} library, {python} Python calls"


def _layer(res: dict) -> list[str]:
    rows = [["x".join(map(str, i["shape"])), i["recipe"], i["fusion"], f"{i['speedup']:.3g}x", i["baseline_ms"], i["fqt_ms"],
             i["lowbit_gemms"], i["fqt_compile_s"], _profile(i["fqt_step_profile"]), _launches(i.get("fqt_launches")),
             _profile(i["baseline_step_profile"])]
            for i in res.get("items", [])]
    return [f"Baseline: {res.get('baseline')}", ""] + _table(
        rows, ["M x K x N", "recipe", "fusion", "speedup", "baseline ms", "fqt ms", "low-bit GEMMs", "fqt compile s",
               "fqt step", "fqt launches (compiled code)", "baseline step"])


def _gemm(res: dict) -> list[str]:
    rows = [["x".join(map(str, i["shape"])), i["role"], "x".join(map(str, i["gemm"])), i["kernel"], i["ms"], i["tflops"],
             i.get("pct_of_peak", "-"), f"{i['vs_high_precision']:.3g}x"] for i in res.get("items", [])]
    lines = [f"Baseline: {res.get('baseline')}", ""] + _table(
        rows, ["layer M x K x N", "GEMM", "rows x K x cols", "kernel", "ms", "TFLOPS", "% of peak", "vs high precision"])
    batched = res.get("batched")
    if batched:
        lines += ["", "Attention's batched GEMMs (fqt int8 qbmm against torch.bmm):", ""]
        lines += _table([[i["gemm"], "x".join(map(str, i["shape"])), i["baseline"], i["baseline_ms"], i["fqt_int8_qbmm_ms"],
                          f"{i['speedup']}x"] for i in batched],
                        ["GEMM", "batch x M x K x N", "baseline", "baseline ms", "fqt ms", "speedup"])
    acc = res.get("fp8_accuracy")
    if acc:
        lines += ["", f"fp8 accuracy, {acc['operands']} at {'x'.join(map(str, acc['gemm']))}, against a {acc['baseline']}:", ""]
        rows = [[k, v.get("rel_fro", v.get("error")), v.get("max_rel", "")] for k, v in acc.items() if isinstance(v, dict)]
        lines += _table(rows, ["kernel", "rel. Frobenius error", "max error / max |ref|"])
    return lines


def _quantize(res: dict) -> list[str]:
    rows = [["x".join(map(str, i["shape"])), i["dtype"], i["spec"], i["ms"], i["gb_s"], i["copy_gb_s"], i["pct_of_copy"],
             i.get("pct_of_hbm_peak", "-")] for i in res.get("items", [])]
    return [f"Baseline: {res.get('baseline')}", ""] + _table(
        rows, ["shape", "input", "quantizer", "ms", "GB/s", "copy GB/s", "% of copy", "% of HBM peak"])


def _e2e(res: dict) -> list[str]:
    lines = [f"Config: {res.get('config')}", ""]
    rows = []
    for label in ("baseline", "fqt int8"):
        r = res.get(label)
        if r:
            rows.append([label, r["compile_and_first_step_s"], r["median_step_ms"], r["tokens_per_s"],
                         r.get("peak_memory_gib", "-"), r["losses"][-1], r.get("lowbit_gemms", "-")])
        elif f"{label} progress" in res:
            rows.append([label, "(cut)", "-", "-", "-", res[f"{label} progress"]["losses"][-1:], "-"])
    lines += _table(
        rows, ["run", "compile + first step s", "median step ms", "tokens/s", "peak GiB", "final loss", "low-bit GEMMs"]
    )
    if "comparison" in res:
        lines += ["", f"Comparison: {res['comparison']}"]
    return lines


def _conv(res: dict) -> list[str]:
    lines = [f"Config: {res.get('config')}", ""]
    layer = res.get("layer")
    if layer:
        lines += [f"One layer ({layer['conv']}), {layer['recipe']}: {layer['speedup']}x ({layer['fqt_ms']} ms against "
                  f"{layer['baseline_ms']} ms; {layer['lowbit_gemms']} low-bit GEMMs; compile {layer['fqt_compile_s']} s)", ""]
    rows = [[i["recipe"], f"{i['speedup']}x", i["baseline_ms"], i["fqt_ms"], f"{i['lowbit_gemms']}/{i['gemms']}",
             i["fqt_compile_s"], i["fqt_step_profile"]] for i in res.get("items", [])]
    return lines + _table(rows, ["recipe", "speedup", "baseline ms", "fqt ms", "low-bit GEMMs", "fqt compile s", "fqt step"])


_TABLES = {"preflight": _preflight, "tests": _tests, "layer": _layer, "gemm": _gemm, "quantize": _quantize, "conv": _conv,
           "e2e": _e2e}


def stage_tables(name: str, res: dict) -> list[str]:
    """The markdown lines for stage ``name``'s results (partial results render as far as they go)."""
    try:
        return _TABLES[name](res)
    except (KeyError, TypeError, ValueError) as exc:  # a partial or malformed record: show it raw rather than lose it
        return [f"(could not tabulate: {type(exc).__name__}: {exc})", "", "```", str(res)[:4000], "```"]
