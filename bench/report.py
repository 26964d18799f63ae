"""Turn a results JSON into docs/benchmarks.md tables and PNG plots (matplotlib).

python -m bench.report [bench/results/latest.json]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.stack import ROOT

PATH_LABEL = {
    "direct": "direct (client -> upstream)",
    "llmfleet-openai": "llmfleet, openai engine",
    "llmfleet-sim": "llmfleet, sim engine",
    "litellm": "LiteLLM proxy",
}


def _med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _spread(rows: list[dict[str, float]], key: str) -> str:
    vals = [r[key] for r in rows]
    return f"{min(vals):.2f}-{max(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"


def latency_table(res: dict[str, Any]) -> tuple[str, dict[str, dict[str, float]]]:
    lines = [
        "| concurrency | path | TTFT p50 ms (spread) | TTFT p99 ms | added TTFT p50 / p99 ms "
        "| TTFT ratio p50 | ITL p50 ms | added ITL p50 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    added: dict[str, dict[str, float]] = {}
    for level, paths in res["latency"].items():
        direct = paths["direct"]
        d50, d99 = _med(direct, "ttft_p50_ms"), _med(direct, "ttft_p99_ms")
        di50 = _med(direct, "itl_p50_ms")
        for path, rows in paths.items():
            t50, t99 = _med(rows, "ttft_p50_ms"), _med(rows, "ttft_p99_ms")
            i50 = _med(rows, "itl_p50_ms")
            added.setdefault(level, {})[path] = t50 - d50
            added[level][path + ":p99"] = t99 - d99
            label = PATH_LABEL.get(path, path)
            lines.append(
                f"| {level[1:]} | {label} | {t50:.2f} ({_spread(rows, 'ttft_p50_ms')}) "
                f"| {t99:.2f} | {t50 - d50:+.2f} / {t99 - d99:+.2f} | {t50 / d50:.2f} "
                f"| {i50:.2f} | {i50 - di50:+.2f} | {sum(r['errors'] for r in rows)} |"
            )
    return "\n".join(lines), added


def throughput_table(res: dict[str, Any]) -> str:
    lines = [
        "| concurrency | path | req/s | ratio to direct | p99 ms | errors "
        "| gateway CPU ms/req | worker CPU ms/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level, paths in res["throughput"].items():
        if not level.startswith("c"):
            continue
        base = paths["direct"]["rps"]
        for path, row in paths.items():
            g = row.get("gateway_cpu_ms_per_req")
            w = row.get("worker_cpu_ms_per_req")
            lines.append(
                f"| {level[1:]} | {PATH_LABEL.get(path, path)} | {row['rps']:.0f} "
                f"| {row['rps'] / base:.2f} | {row['p99_ms']:.1f} | {row['errors']:.0f} "
                f"| {'' if g is None else f'{g:.2f}'} | {'' if w is None else f'{w:.2f}'} |"
            )
    return "\n".join(lines)


def capacity_table(res: dict[str, Any]) -> str:
    lines = [
        "| streams | tokens/s delivered | token delay p50 ms | p99 ms | late (>50 ms) % "
        "| broken streams | gateway CPU % |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["capacity"].values():
        lines.append(
            f"| {row['streams']} | {row['tokens_per_s']:.0f} | {row['token_delay_p50_ms']:.1f} "
            f"| {row['token_delay_p99_ms']:.1f} | {row['late_tokens_pct']:.2f} "
            f"| {row['broken_streams']} | {row['gateway_cpu_pct']:.0f} |"
        )
    return "\n".join(lines)


def memory_table(res: dict[str, Any]) -> str:
    lines = ["| idle open streams | gateway RSS before MB | with streams MB | KB per stream |",
             "|---|---|---|---|"]  # fmt: skip
    for n, row in res["memory"].items():
        lines.append(
            f"| {n} | {row['rss_before_mb']:.1f} | {row['rss_with_streams_mb']:.1f} "
            f"| {row['kb_per_stream']:.1f} |"
        )
    return "\n".join(lines)


def overload_table(res: dict[str, Any]) -> str:
    o = res["overload"]
    keys = [
        "capacity_rps", "offered_rps", "sent", "completed", "rejected", "failed", "lost",
        "worker_completed", "duplicated_or_unseen", "latency_p50_s", "latency_p99_s",
    ]  # fmt: skip
    lines = ["| measure | value |", "|---|---|"]
    for k in keys:
        v = o[k]
        lines.append(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def plots(res: dict[str, Any], img: Path) -> list[str]:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return []
    img.mkdir(parents=True, exist_ok=True)
    made = []
    if "latency" in res:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        levels = list(res["latency"])
        paths = [p for p in res["latency"][levels[0]] if p != "direct"]
        for ax, key in zip(axes, ("ttft_p50_ms", "ttft_p99_ms"), strict=True):
            width = 0.8 / max(1, len(paths))
            for i, path in enumerate(paths):
                vals = []
                for lv in levels:
                    d = _med(res["latency"][lv]["direct"], key)
                    vals.append(max(0.01, _med(res["latency"][lv][path], key) - d))
                xs = [j + i * width for j in range(len(levels))]
                ax.bar(xs, vals, width, label=PATH_LABEL.get(path, path))
            ax.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(levels))])
            ax.set_xticklabels([f"concurrency {lv[1:]}" for lv in levels])
            ax.set_yscale("log")
            ax.set_ylabel("added ms vs direct (log)")
            ax.set_title(f"Added time to first token, {key.split('_')[1]}")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "bench-ttft.png", dpi=110)
        plt.close(fig)
        made.append("bench-ttft.png")
    if "throughput" in res:
        fig, ax = plt.subplots(figsize=(6, 4))
        levels = [lv for lv in res["throughput"] if lv.startswith("c")]
        for path in res["throughput"][levels[0]]:
            ax.plot([int(lv[1:]) for lv in levels],
                    [res["throughput"][lv][path]["rps"] for lv in levels],
                    marker="o", label=PATH_LABEL.get(path, path))  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests/s (max_tokens 1)")
        ax.set_title("Non-streaming throughput")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "bench-throughput.png", dpi=110)
        plt.close(fig)
        made.append("bench-throughput.png")
    if "capacity" in res:
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = list(res["capacity"].values())
        ax.plot([r["streams"] for r in rows], [r["token_delay_p99_ms"] for r in rows],
                marker="o", label="p99")  # fmt: skip
        ax.plot([r["streams"] for r in rows], [r["token_delay_p50_ms"] for r in rows],
                marker="o", label="p50")  # fmt: skip
        ax.axhline(20, color="grey", linestyle="--", label="target p99 20 ms")
        ax.set_xlabel("concurrent streams at 50 tokens/s")
        ax.set_ylabel("per-token added delay ms")
        ax.set_title("One gateway process: streaming capacity")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "bench-capacity.png", dpi=110)
        plt.close(fig)
        made.append("bench-capacity.png")
    return made


def write_report(res: dict[str, Any], docs: Path) -> None:
    parts = [f"_Generated by `python -m bench.report` from the run of {res['when']} on "
             f"{res['machine']}; upstream TTFT {res['upstream']['ttft_ms']:g} ms, inter-token "
             f"{res['upstream']['itl_ms']:g} ms._\n"]  # fmt: skip
    if "latency" in res:
        table, _ = latency_table(res)
        parts += ["### Time to first token and inter-token latency (streaming, 16 tokens)\n",
                  table, "\n![added TTFT](img/bench-ttft.png)\n"]  # fmt: skip
    if "throughput" in res:
        parts += [f"### Non-streaming throughput (max_tokens 1, {res['throughput']['tool']})\n",
                  throughput_table(res), "\n![throughput](img/bench-throughput.png)\n"]  # fmt: skip
    if "capacity" in res:
        parts += ["### Streaming capacity of one gateway (sim engine, 50 tokens/s per stream)\n",
                  capacity_table(res), "\n![capacity](img/bench-capacity.png)\n"]  # fmt: skip
    if "memory" in res:
        parts += ["### Gateway memory per open stream\n", memory_table(res), ""]
    if "overload" in res:
        parts += ["### 4x overload (open loop)\n", overload_table(res), ""]
    plots(res, docs / "img")
    (docs / "benchmarks-results.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / "latest.json"
    write_report(json.loads(src.read_text()), ROOT / "docs")
    print(f"wrote {ROOT / 'docs' / 'benchmarks-results.md'}")
