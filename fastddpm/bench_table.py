"""The text forms of a `fastddpm bench` report: the full table and the one-line-per-row headline.

Both read only the report dict (the JSON `fastddpm bench --json` writes), so a report from
another machine, or one cut off by a time limit, prints the same way.
"""
from __future__ import annotations

HEADLINE_BATCH, HEADLINE_STEPS = 256, 1000  # the size the DDPM paper's sampling figures are quoted at
HEADLINE_PEER = "diffusers-compile"
# An accuracy error (x_0 of the short accuracy run against eager-bf16's) above this is marked "!":
# bf16 rounding alone stays near 1e-2 (fp32 and bf16 rows differ by ~4e-3 after 20 tiny-preset steps,
# bench/RESULTS.md); a row that computes another function lands near 1.
ACCURACY_FLAG = 0.1


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def accuracy_cell(row: dict, flag: float = ACCURACY_FLAG) -> str:
    """A row's rel_err_vs_eager_bf16 as the table shows it: "3.1e-03", "4.2e-01 !" above `flag`
    (or not finite), "error" when its accuracy run raised, "-" when there is none."""
    err = row.get("rel_err_vs_eager_bf16")
    if err is None:
        return "error" if row.get("accuracy_error") else "-"
    return f"{err:.1e}" + ("" if err <= flag else " !")  # NaN compares False: flagged


def format_table(report: dict) -> str:
    """The report as the text table `fastddpm bench` prints."""
    req, mach, ceil, model = report["request"], report["machine"], report["ceilings"], report["model"]
    lines = [
        f"fastddpm bench: {model['preset']} ({model['gflop_per_image_forward']:.2f} GFLOP/image forward, "
        f"{model['parameters']:,} parameters), batch {req['batch']}, {req['steps']} steps, "
        f"on {mach['device_name']} ({mach['device']})",
        f"measured peak {ceil['peak']['tflops']:.4g} TFLOP/s ({ceil['peak']['dtype']} matmul "
        f"{ceil['peak']['n']}^3), copy {ceil['copy']['gbps']:.4g} GB/s (read + write); "
        f"torch {mach['torch']}, commit {(mach['commit'] or 'unknown')[:12]}, {mach['date']}"
        + (f", load average {mach['load_average']:.2f} at start on {mach['cpu_count']} CPUs"
           if mach.get("load_average") is not None else ""),
    ]
    fp32 = report.get("fp32_precision")
    if fp32:  # reports written before this field existed have none
        lines.append(f"fp32 rows: {fp32['summary']} (cudnn.allow_tf32={fp32['cudnn_allow_tf32']}, "
                     f"matmul.allow_tf32={fp32['matmul_allow_tf32']}, "
                     f"float32_matmul_precision={fp32['float32_matmul_precision']!r}); "
                     f"ceilings timed by {ceil['peak'].get('clock', 'host')} clock")
    lines.append("")
    accuracy = report.get("accuracy") or {}  # reports written before the accuracy column have none
    flag = accuracy.get("flag_above", ACCURACY_FLAG)
    header = ("row", "dtype", "layout", "images/s", "ms/step", "spread", "TFLOP/s", "of peak", "vs ref",
              "vs diffusers", "warm-up s", "err vs ref", "err vs bf16")
    table = [header]
    notes = []
    for r in report["rows"]:
        if r["status"] != "ok":
            table.append((r["name"], r["dtype"], r["layout"], r["status"]) + ("",) * (len(header) - 4))
            notes.append(f"  {r['name']}: {r['status']}: {r['reason']}")
            continue
        table.append((r["name"], r["dtype"], r["layout"], _fmt(r["images_per_s"], ".4g"), _fmt(r["ms_per_step"], ".4g"),
                      _fmt(100 * r["spread"], ".0f", "%"), _fmt(r["tflops"], ".3g"),
                      _fmt(100 * r["peak_fraction"], ".3g", "%"),
                      _fmt(r["speedup_vs_reference"], ".2f", "x"), _fmt(r["speedup_vs_diffusers"], ".2f", "x"),
                      _fmt(r["warmup_s"], ".3g"), _fmt(r["rel_err_vs_reference"], ".1e"), accuracy_cell(r, flag)))
        if r.get("accuracy_error"):
            notes.append(f"  {r['name']}: accuracy run failed: {r['accuracy_error']}")
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for i, line in enumerate(table):
        cells = [str(c).ljust(w) if j < 3 else str(c).rjust(w) for j, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    peers = [r for r in report["rows"] if r["engine"] == "diffusers" and r["status"] == "ok"]
    best = max(peers, key=lambda r: r["images_per_s"], default=None)
    lines += ["",
              f"medians of {req['repeat']} timed run(s) of {req['steps']} steps per row, after a warm-up reported "
              "apart ('warm-up s': compilation, capture):",
              "fastddpm rows: sampling.warm_up on the timed process and shape; diffusers rows: a "
              f"{req['peer_warmup_steps']}-step run;",
              "'spread': (slowest - fastest) / median of the timed runs; 'of peak': achieved TFLOP/s over the "
              "matmul peak measured above;",
              f"'vs diffusers': over {best['name'] if best else 'the fastest diffusers row (none ran)'}; "
              "'err vs ref': ||x0 - x0_ref|| / ||x0_ref|| of the final samples (same seed, same noise)"]
    if accuracy.get("steps") and accuracy.get("status") != "pending":  # pending: no row ran to compare
        if accuracy.get("status") == "ok":
            lines.append(f"'err vs bf16': x0 of a {accuracy['steps']}-step run (timesteps {accuracy.get('timesteps')}, "
                         f"seed {accuracy['seed']}) against {accuracy['against']}'s, in this run; diffusers rows: "
                         f"their U-Net with the same weights in fastddpm's sampler; '!' above {flag:g}")
        else:
            lines.append(f"'err vs bf16': none: the {accuracy['against']} accuracy run {accuracy['status']}: "
                         f"{accuracy.get('reason', '')}")
    warmups = [f"{r['name']}: {r['notes']}" for r in report["rows"] if r["status"] == "ok" and r.get("notes")]
    if warmups:
        lines += ["row notes: " + "; ".join(warmups)]
    if notes:
        lines += ["not timed, or not compared:"] + notes
    return "\n".join(lines)


def headline_lines(report: dict, peer: str = HEADLINE_PEER) -> list[str]:
    """One line per row: images/s, seconds per 256-image x 1000-step run, % of the measured peak,
    ratio to `peer` (images/s over the peer's), and the accuracy error against eager-bf16
    (`accuracy_cell`); a row that did not run gives its status and reason.

    Seconds per 256 x 1000 run is the row's median scaled linearly from the bench's batch and
    steps when those differ (the line says so).
    """
    req, ceil = report["request"], report["ceilings"]
    flag = (report.get("accuracy") or {}).get("flag_above", ACCURACY_FLAG)
    scale = (HEADLINE_BATCH / req["batch"]) * (HEADLINE_STEPS / req["steps"])
    size = f"{HEADLINE_BATCH} x {HEADLINE_STEPS}" + ("" if scale == 1 else
                                                     f" (scaled from {req['batch']} x {req['steps']})")
    ref = next((r for r in report["rows"] if r["name"] == peer and r["status"] == "ok"), None)
    width = max((len(r["name"]) for r in report["rows"]), default=0)
    lines = []
    for r in report["rows"]:
        name = r["name"].ljust(width)
        if r["status"] != "ok":
            lines.append(f"{name}  {r['status']}: {r['reason']}")
            continue
        ratio = f"{r['images_per_s'] / ref['images_per_s']:.2f}x {peer}" if ref else f"no {peer} row"
        lines.append(f"{name}  {r['images_per_s']:8.4g} images/s  {r['median_s'] * scale:8.4g} s per {size} run  "
                     f"{100 * r['peak_fraction']:6.3g}% of the measured {ceil['peak']['dtype']} peak  {ratio}  "
                     f"err vs eager-bf16 {accuracy_cell(r, flag)}")
    return lines
