"""Renders key panels of the RLHF dashboard to a PNG from a Prometheus, without Grafana.

    python deploy/grafana/render.py --prometheus http://127.0.0.1:9090 --run demo-20261122-082126 --out run.png

The panels and their queries are read from deploy/grafana/dashboards/rlhf.json (found by title), so the picture shows
what the dashboard shows. The time span is the run's: from the first scrape of ``rlhf_iteration{run_id=RUN}`` to the
first scrape at its final value (within ``--lookback``), or ``--start``/``--end`` in Unix seconds. Variables are
substituted as Grafana does: ``$run``, ``$__interval`` (the step) and ``$__rate_interval`` (max(4 x scrape
interval, step + scrape interval), the scrape interval read from Prometheus's own config).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import httpx
import yaml

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "rlhf.json"
PANELS = (
    "Reward",
    "KL and KL coefficient",
    "Iteration time by phase",
    "gRPC request rate",
    "gRPC latency p95",
    "Response tokens/s",
)
UNIT_LABELS = {"s": "seconds", "bytes": "bytes", "Bps": "bytes/s", "reqps": "requests/s", "percentunit": "share"}
ENGINEERING_UNITS = {"s": "s", "bytes": "B", "Bps": "B/s"}  # tick labels like "20 ms", "3 MB/s"
MAX_POINTS = 10_000  # Prometheus refuses more than 11,000 points per series


class RenderError(RuntimeError):
    pass


class Prometheus:
    def __init__(self, url: str):
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=30)

    def _get(self, path: str, **params) -> dict:
        response = self.client.get(path, params=params)
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if response.status_code != 200 or body.get("status") != "success":
            raise RenderError(f"{path} {params}: HTTP {response.status_code} {body.get('error', response.text[:200])}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def scrape_interval(self) -> float:
        config = yaml.safe_load(self._get("/api/v1/status/config")["yaml"])
        return parse_duration(config.get("global", {}).get("scrape_interval", "1m"))


def parse_duration(text: str) -> float:
    """A Prometheus duration ("5s", "1m30s", "2h") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def duration(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


def substitute(expr: str, run: str, step: float, rate_interval: float) -> str:
    for name, value in (
        ("$__rate_interval", duration(rate_interval)),
        ("$__interval", duration(step)),
        ("${run}", run),
        ("$run", run),
    ):
        expr = expr.replace(name, value)
    return expr


def run_span(prometheus: Prometheus, run: str, lookback: float, scrape: float) -> tuple[float, float]:
    """(start, end) of the run: the first scrape that saw it, and the first that saw its last iteration."""
    end = time.time()
    start = end - lookback
    for _ in range(2):  # coarse over the lookback, then fine around what it found
        step = max(1.0, (end - start) / MAX_POINTS)
        series = prometheus.query_range(f'max(rlhf_iteration{{run_id="{run}"}})', start, end, step)
        points = [(float(t), float(v)) for t, v in series[0]["values"]] if series else []
        if not points:
            raise RenderError(f"no rlhf_iteration for run {run!r} in the last {lookback / 3600:g} h")
        last = max(v for _, v in points)
        first_t = points[0][0]
        done_t = next(t for t, v in points if v == last)
        start, end = first_t - step, min(time.time(), done_t + step)
    return start - scrape, min(time.time(), end + 2 * scrape)


def legend(template: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip() or "value"


def draw(ax, panel: dict, prometheus: Prometheus, run: str, start: float, end: float, step: float, scrape: float):
    from matplotlib.ticker import EngFormatter

    defaults = panel["fieldConfig"]["defaults"]
    custom = defaults.get("custom", {})
    right_refs = {
        o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
        for o in panel["fieldConfig"].get("overrides", [])
        if o["matcher"]["id"] == "byFrameRefID"
    }
    right_ax = ax.twinx() if right_refs else None
    stacked = custom.get("stacking", {}).get("mode") == "normal"
    rate_interval = max(4 * scrape, step + scrape)
    lines = 0
    for target in panel["targets"]:
        expr = substitute(target["expr"], run, step, rate_interval)
        axis = right_ax if target["refId"] in right_refs else ax
        curves = []
        for series in prometheus.query_range(expr, start, end, step):
            xs = [float(t) - start for t, _ in series["values"]]
            ys = [float(v) for _, v in series["values"]]
            curves.append((legend(target.get("legendFormat", ""), series["metric"]), xs, ys))
        if stacked and curves:
            # Align on the step grid; a missing or NaN point counts as 0 in the stack, as in Grafana.
            grid = [i * step for i in range(int((end - start) // step) + 1)]
            stack = [[0.0] * len(grid) for _ in curves]
            for row, (_, xs, ys) in zip(stack, curves, strict=True):
                for x, y in zip(xs, ys, strict=True):
                    if not math.isnan(y) and round(x / step) < len(grid):
                        row[round(x / step)] = y
            axis.stackplot(grid, stack, labels=[name for name, _, _ in curves], alpha=0.7)
        else:
            for name, xs, ys in curves:
                axis.plot(xs, ys, label=name, linewidth=1.2, color=f"C{lines}")
                lines += 1
    unit = defaults.get("unit", "short")
    ax.set_ylabel(custom.get("axisLabel") or UNIT_LABELS.get(unit, ""))
    if unit in ENGINEERING_UNITS:
        ax.yaxis.set_major_formatter(EngFormatter(unit=ENGINEERING_UNITS[unit]))
    elif unit == "percentunit":
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    handles, labels = ax.get_legend_handles_labels()
    if right_ax is not None:
        override = next(iter(right_refs.values()))
        right_ax.set_ylabel(override.get("custom.axisLabel", ""))
        more_handles, more_labels = right_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="best", ncol=2 if len(labels) > 4 else 1)
    ax.set_title(panel["title"], fontsize=10)
    ax.set_xlabel("time since the run started (s)")
    ax.grid(alpha=0.3)


def render(prometheus_url: str, run: str, out: Path, start: float | None, end: float | None, lookback: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    by_title = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    missing = [t for t in PANELS if t not in by_title]
    if missing:
        raise RenderError(f"panels not in {DASHBOARD.name}: {missing}")
    prometheus = Prometheus(prometheus_url)
    scrape = prometheus.scrape_interval()
    if start is None or end is None:
        found_start, found_end = run_span(prometheus, run, lookback, scrape)
        start, end = start or found_start, end or found_end
    step = max(scrape / 5, (end - start) / 300)  # about 300 points across, none finer than a fifth of a scrape
    figure, axes = plt.subplots(3, 2, figsize=(12, 10), dpi=72)
    for ax, title in zip(axes.flat, PANELS, strict=True):
        draw(ax, by_title[title], prometheus, run, start, end, step, scrape)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
    figure.suptitle(f"{dashboard['title']}: run {run} ({when}, {end - start:.0f} s)", fontsize=12)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--run", required=True, help="the run id (the run_id label)")
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--start", type=float, help="Unix seconds; default: the run's first scrape")
    parser.add_argument("--end", type=float, help="Unix seconds; default: the run's last iteration")
    parser.add_argument("--lookback", default="24h", help="how far back to look for the run (default 24h)")
    args = parser.parse_args(argv)
    try:
        out = render(args.prometheus, args.run, args.out, args.start, args.end, parse_duration(args.lookback))
    except (RenderError, httpx.HTTPError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
