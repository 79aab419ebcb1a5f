"""Queries while the catalog and the model change: 8 clients against `searchsvc serve` on
embedded defaults while an ingest of 5,000+ images and a retrain's promotion run in other
processes.

    python benchmarks/bench_serve_churn.py --out benchmarks/results/serve/<date>-<machine>-churn

One run, in order, in a fresh home (small profile, the first embedder a seeded random init):

1. `searchsvc ingest` of a demo catalog (``--products`` x ``--views`` Fashion-MNIST articles),
   no server yet.
2. `searchsvc serve --port 0` starts; ``--clients`` threads of this process query it in a
   closed loop (multipart upload of held-out photos, top 10) until the end.
3. Phases, each timed by the clients' request start: ``before`` (``--idle-seconds``),
   ``ingest`` (`searchsvc ingest` of a second catalog, ``--more-products`` x
   ``--more-views`` images, in its own process: it reaches the server, the store's owner),
   ``retrain`` (`python -m trainer.retrain --only embedder --embedder-steps N` in its own
   process: it trains, gates and, on a win, switches the served collection through the
   server, which re-embeds every image), ``after`` (``--idle-seconds``).

A failed query is any answer but 200 with results, or a transport error; the run exits 1
when there was one. Latency per phase: p50/p95/p99 over the queries that started in it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_serve import env_for
from machine import cpu_name, git_commit

from searchsvc.learning.datasets import write_demo_catalog


@dataclass(frozen=True)
class Answer:
    began: float
    ms: float
    ok: bool
    embedder_version: int | None
    detail: str


def run_command(home: Path, args: list[str], log: Path) -> tuple[float, str]:
    """One command in its own process; its wall seconds and its stdout."""
    began = time.perf_counter()
    with log.open("w") as errors:
        done = subprocess.run(
            [sys.executable, *args],
            env=env_for(home),
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            timeout=3600,
        )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{log.read_text()}")
    return time.perf_counter() - began, done.stdout


def latency_row(answers: list[Answer]) -> dict[str, Any]:
    ms = [a.ms for a in answers if a.ok]
    failed = [a for a in answers if not a.ok]

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ms, q)), 1) if ms else None

    return {
        "queries": len(answers),
        "failed": len(failed),
        "first_failures": [a.detail for a in failed[:3]],
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "embedder_versions": sorted({a.embedder_version for a in answers if a.ok}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=300)
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--more-products", type=int, default=1300)
    parser.add_argument("--more-views", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--embedder-steps", type=int, default=200)
    parser.add_argument("--out", type=Path, help="Write <out>.json and <out>.md.")
    parser.add_argument("--note", default="", help="What else ran on the machine.")
    args = parser.parse_args()

    report: dict[str, Any] = {
        "machine": {
            "date": dt.date.today().isoformat(),
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "git_commit": git_commit(),
            "command": " ".join(sys.argv),
            "note": args.note,
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-churn-") as tmp:
        work = Path(tmp)
        catalog, queries = write_demo_catalog(
            work / "first", products=args.products, views=args.views, cache_dir=work / "cache"
        )
        more, _ = write_demo_catalog(
            work / "more",
            products=args.more_products,
            views=args.more_views,
            seed=1,
            cache_dir=work / "cache",
        )
        home = work / "home"
        seconds, _ = run_command(
            home, ["-m", "searchsvc.cli", "ingest", str(catalog), "--no-progress"], work / "i0"
        )
        report["first_ingest"] = {"images": args.products * args.views, "seconds": seconds}
        photos = [p.read_bytes() for p in sorted(queries.iterdir())[:64]]

        serve_log = (work / "serve.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "searchsvc.cli", "serve", "--port", "0"],
            env=env_for(home),
            stdout=serve_log,
            stderr=subprocess.STDOUT,
        )
        answers: list[Answer] = []
        stop = threading.Event()
        try:
            announced = home / "server.json"
            deadline = time.monotonic() + 300
            while not announced.exists():
                assert server.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.1)
            url = json.loads(announced.read_text())["url"]
            while httpx.get(url + "/readyz").status_code != 200:
                assert server.poll() is None and time.monotonic() < deadline, "not ready"
                time.sleep(0.2)

            def client(number: int) -> None:
                with httpx.Client(base_url=url, timeout=120) as http:
                    n = number
                    while not stop.is_set():
                        began = time.perf_counter()
                        try:
                            response = http.post(
                                "/v1/search",
                                params={"top_k": 10},
                                files={"image": ("q.jpg", photos[n % len(photos)])},
                            )
                            body = response.json() if response.status_code == 200 else None
                            ok = bool(body and body["results"])
                            version = body["embedder_version"] if body else None
                            detail = "" if ok else f"{response.status_code}: {response.text[:200]}"
                        except httpx.HTTPError as exc:
                            ok, version, detail = False, None, repr(exc)[:200]
                        ms = (time.perf_counter() - began) * 1000
                        answers.append(Answer(began, ms, ok, version, detail))
                        n += args.clients

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            marks = {"before": time.perf_counter()}
            time.sleep(args.idle_seconds)
            marks["ingest"] = time.perf_counter()
            seconds, out = run_command(
                home, ["-m", "searchsvc.cli", "ingest", str(more), "--json"], work / "i1"
            )
            summary = json.loads(out)
            report["ingest"] = {
                "seconds": round(seconds, 1),
                "images_embedded": summary["images_embedded"],
                "images_failed": summary["images_failed"],
                "images_per_s": round(summary["images_embedded"] / seconds, 1),
            }
            print("ingest:", report["ingest"], flush=True)
            marks["retrain"] = time.perf_counter()
            seconds, out = run_command(
                home,
                [
                    "-m",
                    "trainer.retrain",
                    "--only",
                    "embedder",
                    "--embedder-steps",
                    str(args.embedder_steps),
                    "--no-progress",
                    "--json",
                ],
                work / "r",
            )
            retrain = json.loads(out)
            report["retrain"] = {"seconds": round(seconds, 1), "report": retrain}
            print("retrain:", json.dumps(retrain)[:600], flush=True)
            marks["after"] = time.perf_counter()
            time.sleep(args.idle_seconds)
            marks["end"] = time.perf_counter()
            stop.set()
            for thread in threads:
                thread.join()
            report["server_stdout_lines"] = None
        finally:
            stop.set()
            server.send_signal(signal.SIGINT)
            server.wait(timeout=120)
            serve_log.close()

    names = ["before", "ingest", "retrain", "after"]
    bounds = [marks[n] for n in names] + [marks["end"]]
    phases: dict[str, Any] = {}
    for i, name in enumerate(names):
        inside = [a for a in answers if bounds[i] <= a.began < bounds[i + 1]]
        phases[name] = {"seconds": round(bounds[i + 1] - bounds[i], 1), **latency_row(inside)}
    report["phases"] = phases
    report["all"] = latency_row(answers)
    text = render(report, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    if report["all"]["failed"]:
        raise SystemExit(1)


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
    m = report["machine"]
    stage = report["retrain"]["report"]["stages"]["embedder"]
    swap = stage.get("swap") or {}
    decision = stage.get("decision") or {}
    lines = [
        f"# bench_serve_churn, {m['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, commit {m['git_commit']}"
        + (f"; {m['note']}" if m["note"] else ""),
        f"Command: `{m['command']}`",
        f"Setup: embedded defaults, small profile, no STIR; first catalog "
        f"{args.products} x {args.views} images; {args.clients} client threads (multipart, "
        "top 10) in the benchmark process, closed loop.",
        f"Ingest during the load: {report['ingest']['images_embedded']} images embedded, "
        f"{report['ingest']['images_failed']} failed, {report['ingest']['seconds']} s "
        f"({report['ingest']['images_per_s']} img/s).",
        f"Retrain during the load: {args.embedder_steps} embedder steps, "
        f"{report['retrain']['seconds']} s; promoted: {stage['promoted']} "
        f"(gate: {json.dumps(decision)[:300]}); switch: {swap.get('images_embedded')} images "
        f"re-embedded in {swap.get('seconds')} s under the load.",
        "",
        "| phase | seconds | queries | failed | p50 ms | p95 ms | p99 ms | embedder versions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in [*report["phases"].items(), ("all", report["all"])]:
        lines.append(
            f"| {name} | {row.get('seconds', '')} | {row['queries']} | {row['failed']} | "
            f"{row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | "
            f"{', '.join(str(v) for v in row['embedder_versions'])} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
