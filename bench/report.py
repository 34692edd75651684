"""Turn run.py's results into two PNG plots and the README's Performance section (markdown)."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _statuses(runs: list[dict[str, Any]]) -> str:
    """Status counts summed over runs: '200: 9221, 503: 17066'."""
    counts: Counter[str] = Counter()
    for run in runs:
        counts.update(run["status_counts"])
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def plot_throughput(results: dict[str, Any], path: Path) -> None:
    """Throughput (200s/s) against closed-loop clients per server; the open-loop runs of ours beside it."""
    open_runs = [(name, results[name]) for name in ("soak", "overload") if results.get(name)]
    fig, axes = plt.subplots(1, 2 if open_runs else 1, figsize=(11 if open_runs else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    for name, levels in results["servers"].items():
        xs = sorted(levels, key=int)
        ax.plot([int(c) for c in xs], [levels[c]["median"]["ok_per_s"] for c in xs], marker="o", label=name)
    if results.get("offline"):
        ax.axhline(results["offline"]["median"]["best_images_per_s"], linestyle="--", color="gray",
                   label="offline limit (no HTTP), one process")
        if processes := results["offline"].get("processes"):
            ax.axhline(processes["median"]["best_images_per_s"], linestyle=":", color="black",
                       label=f"offline limit (no HTTP), {processes['processes']} processes")
    ax.set_xscale("log", base=2)
    clients = sorted({int(c) for levels in results["servers"].values() for c in levels})
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("closed-loop clients")
    ax.set_ylabel("200 responses / s")
    ax.set_title("Throughput against offered load")
    ax.set_ylim(bottom=0)
    ax.legend()
    if open_runs:
        ax = axes[0][1]
        offered = [run["rate"] for _, run in open_runs]
        ax.plot(offered, [run["median"]["goodput_per_s"] for _, run in open_runs], marker="o", label="goodput")
        ax.plot(offered, [run["median"]["completed_per_s"] for _, run in open_runs], marker="s",
                label="answers (any status)")
        ax.plot([0, max(offered)], [0, max(offered)], linestyle=":", color="gray", label="offered")
        ax.set_xlabel("offered load, requests/s (Poisson)")
        ax.set_ylabel("per second")
        ax.set_title("ours, open loop (70% and 200% of saturation)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(results: dict[str, Any], path: Path) -> None:
    """Latency percentiles of 200s per server, one panel per concurrency."""
    levels = results["latency_levels"]
    fig, axes = plt.subplots(1, len(levels), figsize=(5.5 * len(levels), 4.2), squeeze=False)
    names = list(results["servers"])
    width = 0.8 / len(names)
    for ax, level in zip(axes[0], levels, strict=True):
        for i, name in enumerate(names):
            median = results["servers"][name][str(level)]["median"]
            values = [median[f"ok_{p}_ms"] or 0.0 for p in ("p50", "p90", "p99")]
            ax.bar([x + i * width for x in range(3)], values, width, label=name)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(3)], ["p50", "p90", "p99"])
        ax.set_ylabel("ms (200 responses)")
        ax.set_title(f"Latency at {level} client{'s' if level > 1 else ''}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio_label(key: str, max_batch_size: int | None) -> str:
    """'ours_over_offline_processes_at_max_batch_size' -> 'ours / offline in processes at batch 8'."""
    at_batch = key.endswith("_at_max_batch_size")
    label = key.removesuffix("_at_max_batch_size").replace("_over_", " / ").replace("_processes", " in processes")
    return label + (f" at batch {max_batch_size}" if at_batch else "")


def markdown(results: dict[str, Any], plots: list[Path], readme_dir: Path) -> str:
    """The Performance section: setup, one table, the open-loop and soak lines, the plots, the command."""
    meta, low, sat = results["meta"], results["latency_levels"][0], results["latency_levels"][-1]
    offline = results.get("offline")
    lines = [
        f"Measured by `bench/run.py` on {meta['cpu']} ({meta['cores']} cores), Python {meta['python']}, "
        f"torch {meta['torch']}" + (f" ({meta['torch_threads']} threads)" if meta.get("torch_threads") else "") +
        f", {meta['size']} JPEGs, "
        f"median of {meta['repeats']} run(s) of {meta['seconds']:g} s each, {meta['date']}. "
        "Generator and server share the machine; the other servers are paused (SIGSTOP) meanwhile, and each "
        "repeat of the offline limit runs between the servers' repeats.",
        "",
        f"| server | C={low} p50 / p99 (ms) | C={sat} 200s/s | C={sat} p50 / p99 (ms) | mean batch at C={sat} |",
        "|---|---|---|---|---|",
    ]
    if offline:
        om = offline["median"]
        lines.append(f"| offline limit, no HTTP, one process | {om['single_image_ms']:.1f} (one image, sequential) | "
                     f"{om['best_images_per_s']:.1f} (batch {om['best_batch_size']}) | – | – |")
        if processes := offline.get("processes"):
            pm = processes["median"]
            lines.append(f"| offline limit, no HTTP, {processes['processes']} processes of "
                         f"{processes['torch_threads']} thread(s) (the service's layout) | – | "
                         f"{pm['best_images_per_s']:.1f} (batch {pm['best_batch_size']}) | – | – |")
    for name, levels in results["servers"].items():
        c1, cs = levels[str(low)]["median"], levels[str(sat)]["median"]
        lines.append(f"| {name} | {_fmt(c1['ok_p50_ms'], 1)} / {_fmt(c1['ok_p99_ms'], 1)} | "
                     f"{_fmt(cs['ok_per_s'], 1)} | {_fmt(cs['ok_p50_ms'])} / {_fmt(cs['ok_p99_ms'])} | "
                     f"{_fmt(cs['mean_batch_size'], 1)} |")
    ratios = results["ratios"]
    lines += ["", "Ratios of 200s/s at saturation: " + ", ".join(
        f"{_ratio_label(key, results['meta'].get('max_batch_size'))} = {_fmt(value, 2)}"
        for key, value in ratios.items() if key != "c1_p50_overhead_ms") +
        f"; ours at C={low}, p50 minus offline single-image latency: {_fmt(ratios.get('c1_p50_overhead_ms'), 1)} ms."]
    if overload := results.get("overload"):
        m, nxt = overload["median"], overload["next_request"]
        lag = max((run["launch_lag_ms"]["p99"] for run in overload["runs"] if run["launch_lag_ms"]), default=0.0)
        lines += ["", f"Overload (ours, TIMEOUT=1.0): Poisson arrivals at {overload['rate']:.0f}/s (2x saturation) "
                  f"for {overload['seconds']:g} s, client deadline {overload['deadline_s']:g} s (answers awaited "
                  f"{overload['deadline_s'] + 0.1:g} s): goodput {_fmt(m['goodput_per_s'], 1)}/s "
                  f"({_fmt(m['goodput_per_s'] / (overload['rate'] / 2), 2)} x saturation), "
                  f"200s p99 {_fmt(m['ok_p99_ms'])} ms, slowest non-200 "
                  f"answer {_fmt(m['max_latency_non_200_ms'])} ms; statuses over all runs "
                  f"{_statuses(overload['runs'])}; the single request right after "
                  f"each run: {', '.join(str(r['status']) for r in nxt)}; generator launch lag p99 {lag:.1f} ms."]
    for name, variant in results.get("overload_variants", {}).items():
        m = variant["median"]
        lines += ["", f"Overload, the same test for {name}: {variant['rate']:.0f}/s (2x its saturation): goodput "
                  f"{_fmt(m['goodput_per_s'], 1)}/s ({_fmt(m['goodput_per_s'] / (variant['rate'] / 2), 2)} x its "
                  f"saturation), 200s p99 {_fmt(m['ok_p99_ms'])} ms, slowest non-200 answer "
                  f"{_fmt(m['max_latency_non_200_ms'])} ms; statuses {_statuses(variant['runs'])}."]
    if soak := results.get("soak"):
        m, mem = soak["median"], soak["memory"]
        lines += ["", f"Soak (ours): {soak['rate']:.0f}/s (70% of saturation) for {soak['seconds']:g} s: "
                  f"goodput {_fmt(m['goodput_per_s'], 1)}/s, 200s p99 {_fmt(m['ok_p99_ms'])} ms; RSS of the "
                  f"server and its model processes, first {mem['window_s']:g} s {mem['first_rss_mib']:.0f} MiB, last "
                  f"{mem['window_s']:g} s {mem['last_rss_mib']:.0f} MiB, largest sample {mem['max_rss_mib']:.0f} MiB, "
                  f"peak (each process's VmHWM, summed) {mem['peak_hwm_mib']:.0f} MiB"
                  + (f"; per minute {', '.join(f'{m:.0f}' for m in per_minute)} MiB."
                     if (per_minute := mem.get("rss_per_minute_mib")) else ".")]
    if ceiling := results.get("ceiling"):
        lines += ["", f"Generator ceiling: {ceiling['completed_per_s']:.0f} requests/s against GET /healthz "
                  f"with {ceiling['concurrency']} clients."]
    lines += ["", " ".join(f"![{p.stem}]({os.path.relpath(p, readme_dir)})" for p in plots),
              "", f"Reproduce: `{meta['command']}`"]
    return "\n".join(lines)


_SECTION = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)


def section_target(readme: Path | None, fallback: Path) -> Path:
    """Where the section goes: `readme` if it exists and has the bench markers, else `fallback`."""
    if readme is not None and readme.exists() and _SECTION.search(readme.read_text()):
        return readme
    return fallback


def write_section(section: str, target: Path) -> None:
    """Replace the text between the bench markers in `target`, or write the section as the whole file."""
    text = target.read_text() if target.exists() else ""
    if _SECTION.search(text):
        target.write_text(_SECTION.sub(lambda _: f"{START}\n{section}\n{END}", text, count=1))
    else:
        target.write_text(section + "\n")
