"""The HTTP service under closed-loop load, against the in-process query call and against
one `searchsvc query` process per photo.

    flock /tmp/cpu.gate flock -x /tmp/cpu.lock \\
        python benchmarks/bench_serve.py --out benchmarks/results/serve/<date>-<machine>-serve

Embedded defaults, small profile, a demo catalog (``--products`` x ``--views`` real
Fashion-MNIST articles) and an untrained small STIR registered as the active reranker
(speed depends on the architecture only). In order, one run:

1. ``searchsvc query`` as a fresh process per photo, no server (``--cold-photos``).
2. In-process: ``App.search_service().query`` (the call the server makes) from 1, 8 and
   32 threads, each a closed loop for ``--seconds``, STIR off then on.
3. ``searchsvc serve`` (a subprocess): the same loads over HTTP (httpx, one connection
   per client thread, multipart upload), then ``searchsvc query`` per photo again, now
   reaching the running server.

Both sides share the machine with the load generator (the client threads run in this
process); the ratio at one client is the HTTP layer's overhead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from machine import REPO, SPEED_PROFILE, cpu_name, git_commit, peak_rss_mib

from searchsvc.app import App
from searchsvc.core.config import load_settings
from searchsvc.jobs.model_files import register_version
from searchsvc.learning.datasets import write_demo_catalog
from searchsvc.models.embedder import load_embedding_net
from searchsvc.models.stir import StirConfig, StirNet, save_stir
from searchsvc.storage.db import ModelKind
from searchsvc.storage.versions import active_version

CLIENTS = (1, 8, 32)


def env_for(home: Path, settings: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its SEARCHSVC_* settings, then ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEARCHSVC_")}
    env.update(PYTHONPATH=str(REPO), SEARCHSVC_HOME=str(home), **SPEED_PROFILE, **(settings or {}))
    return env


def closed_loop(
    make_client: Callable[[], Callable[[bytes], bool]],
    photos: list[bytes],
    clients: int,
    seconds: float,
) -> dict[str, Any]:
    """``clients`` threads, each sending its next photo as soon as the last is answered."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    fallbacks = [0] * clients
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(number: int) -> None:
        send = make_client()
        send(photos[number % len(photos)])  # a warm connection / thread before timing
        start.wait()
        n = number
        while time.perf_counter() < stop_at[0]:
            began = time.perf_counter()
            try:
                reranked = send(photos[n % len(photos)])
            except Exception as exc:  # a failed request is a result, counted
                errors.append(repr(exc)[:200])
                continue
            latencies[number].append((time.perf_counter() - began) * 1000)
            fallbacks[number] += 0 if reranked else 1
            n += clients

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds + 3600  # set for real once all are warm
    start.wait()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    flat = [v for per in latencies for v in per]
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "queries": len(flat),
        "qps": round(len(flat) / elapsed, 1),
        "p50_ms": round(float(np.percentile(flat, 50)), 2) if flat else None,
        "p95_ms": round(float(np.percentile(flat, 95)), 2) if flat else None,
        "p99_ms": round(float(np.percentile(flat, 99)), 2) if flat else None,
        "not_reranked": sum(fallbacks),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def cli_per_photo(
    home: Path, photos: list[Path], settings: dict[str, str] | None = None
) -> dict[str, Any]:
    walls = []
    for photo in photos:
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "searchsvc.cli", "query", str(photo), "--json"],
            env=env_for(home, settings),
            capture_output=True,
            text=True,
            timeout=300,
        )
        walls.append((time.perf_counter() - began) * 1000)
        assert done.returncode == 0, done.stderr
    return {
        "photos": len(photos),
        "median_wall_ms": round(float(np.median(walls)), 1),
        "walls_ms": [round(w, 1) for w in walls],
    }


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=300)
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--cold-photos", type=int, default=4)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="SEARCHSVC_TORCH_THREADS for both sides (0: torch's default, one per core)",
    )
    parser.add_argument("--out", type=Path, help="Write <out>.json and <out>.md.")
    parser.add_argument("--note", default="", help="What else ran on the machine, for the report.")
    parser.add_argument(
        "--exclusive",
        action="store_true",
        help="Say in the report that it ran holding the machine (flock -x /tmp/cpu.lock).",
    )
    args = parser.parse_args()

    report: dict[str, Any] = {
        "machine": {
            "date": dt.date.today().isoformat(),
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "git_commit": git_commit(),
            "command": " ".join(sys.argv),
            "exclusive": args.exclusive,
            "note": args.note,
        },
        "setup": {
            "catalog": f"demo {args.products} products x {args.views} photos (Fashion-MNIST)",
            "profile": "small",
            "stir": "untrained small STIR, top 5, in-process task threads",
            "seconds_per_load": args.seconds,
            "torch_threads": args.torch_threads or "default",
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        catalog, queries = write_demo_catalog(
            work / "demo", products=args.products, views=args.views, cache_dir=work / "cache"
        )
        home = work / "home"
        chosen = {"SEARCHSVC_TORCH_THREADS": str(args.torch_threads)} if args.torch_threads else {}
        settings = load_settings(env={"SEARCHSVC_HOME": str(home), **SPEED_PROFILE, **chosen})
        app = App(settings)
        summary = app.ingest(catalog)
        embedder = active_version(app.db, ModelKind.EMBEDDER)
        assert embedder is not None
        net = load_embedding_net(embedder.file)
        torch.manual_seed(0)
        save_stir(StirNet.from_embedder(net, StirConfig(spec=net.spec)), work / "stir.safetensors")
        register_version(app.db, settings, ModelKind.STIR, work / "stir.safetensors", activate=True)
        app.close()
        report["setup"]["images_indexed"] = summary.images_embedded
        photo_paths = sorted(queries.iterdir())[: args.photos]
        photos = [p.read_bytes() for p in photo_paths]

        # 1. A fresh process per photo, nothing running.
        report["cli_cold"] = cli_per_photo(home, photo_paths[: args.cold_photos], chosen)
        print("cli, no server:", report["cli_cold"], flush=True)

        # 2. In-process: the call the server makes, in this process.
        app = App(settings)
        service = app.search_service()
        for photo in photos[:4]:
            service.query(photo, "warm.jpg")  # models, kernels, the STIR batcher
        in_process: dict[str, list[dict[str, Any]]] = {}
        for rerank in (False, True):

            def local(rerank: bool = rerank) -> Callable[[bytes], bool]:
                def send(data: bytes) -> bool:
                    return service.query(data, "q.jpg", rerank=rerank).reranked

                return send

            label = "stir" if rerank else "no_stir"
            in_process[label] = [
                closed_loop(local, photos, clients, args.seconds) for clients in CLIENTS
            ]
            for row in in_process[label]:
                print("in-process", label, row, flush=True)
        app.close()
        report["in_process"] = in_process
        report["bench_process_peak_rss_mib"] = round(peak_rss_mib(), 1)

        # 3. The server.
        log = (work / "serve.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "searchsvc.cli", "serve", "--port", "0"],
            env=env_for(home, chosen),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            announced = home / "server.json"
            deadline = time.monotonic() + 300
            while not announced.exists():
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            url = json.loads(announced.read_text())["url"]
            started = time.perf_counter()
            while httpx.get(url + "/readyz").status_code != 200:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            report["server_ready_after_announce_s"] = round(time.perf_counter() - started, 1)
            http: dict[str, list[dict[str, Any]]] = {}
            for rerank in (False, True):

                def remote(rerank: bool = rerank) -> Callable[[bytes], bool]:
                    client = httpx.Client(base_url=url, timeout=60)
                    params = {"rerank": "true" if rerank else "false"}

                    def send(data: bytes) -> bool:
                        response = client.post(
                            "/v1/search", params=params, files={"image": ("q.jpg", data)}
                        )
                        response.raise_for_status()
                        return bool(response.json()["reranked"])

                    return send

                label = "stir" if rerank else "no_stir"
                http[label] = [
                    closed_loop(remote, photos, clients, args.seconds) for clients in CLIENTS
                ]
                for row in http[label]:
                    print("http", label, row, flush=True)
            report["http"] = http
            report["cli_through_server"] = cli_per_photo(
                home, photo_paths[: args.cold_photos], chosen
            )
            print("cli, through the server:", report["cli_through_server"], flush=True)
            report["server_peak_rss_mib"] = round(vm_hwm_mib(server.pid), 1)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
            log.close()

    report["overhead_ratio_p50_1_client"] = {
        label: round(
            report["http"][label][0]["p50_ms"] / report["in_process"][label][0]["p50_ms"], 3
        )
        for label in ("no_stir", "stir")
    }
    text = render(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# bench_serve, {m['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['git_commit']}; "
        + ("ran exclusive (flock -x /tmp/cpu.lock)" if m["exclusive"] else "machine shared")
        + (f" ({m['note']})" if m["note"] else ""),
        f"Command: `{m['command']}`",
        f"Setup: {report['setup']['catalog']}, {report['setup']['images_indexed']} images, "
        f"small profile; {report['setup']['stir']}; {report['setup']['seconds_per_load']:g} s "
        f"per load; torch threads {report['setup']['torch_threads']}; client threads in the "
        "benchmark process.",
        "",
        "| path | STIR | clients | queries | QPS | p50 ms | p95 ms | p99 ms | not reranked "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in ("in_process", "http"):
        for label in ("no_stir", "stir"):
            for row in report[path][label]:
                lines.append(
                    f"| {path.replace('_', '-')} | {'on' if label == 'stir' else 'off'} | "
                    f"{row['clients']} | {row['queries']} | {row['qps']} | {row['p50_ms']} | "
                    f"{row['p95_ms']} | {row['p99_ms']} | {row['not_reranked']} | {row['errors']} |"
                )
    ratio = report["overhead_ratio_p50_1_client"]
    lines += [
        "",
        f"HTTP / in-process p50 at 1 client: {ratio['no_stir']} without STIR, "
        f"{ratio['stir']} with STIR.",
        f"`searchsvc query` per photo, no server: median {report['cli_cold']['median_wall_ms']} ms "
        f"wall ({report['cli_cold']['photos']} photos); through the running server: median "
        f"{report['cli_through_server']['median_wall_ms']} ms.",
        f"Peak RSS: server {report['server_peak_rss_mib']} MiB; benchmark process (in-process "
        f"side and clients) {report['bench_process_peak_rss_mib']} MiB. Server ready "
        f"{report['server_ready_after_announce_s']} s after it announced its address.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
