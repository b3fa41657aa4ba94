"""Serve on Ray benchmark: K concurrent WebSocket clients of `leo-rt serve --ray` with 1 and 2 renderer replicas on
a local Ray cluster, and the recovery time after a replica is killed.

For each replica count the application (leo_rt.serve.cluster: ingress, renderer × R, session store) runs on a
local Ray cluster of this machine's CPUs; each renderer replica uses one torch thread, so R replicas have R
threads of compute. For K = 1, 2, 4, 8 (--clients) LMDM sessions stream JPEG frames as fast as the replicas
render them (fps far above capacity: a throughput test) for --seconds after a warm-up. Reported per (R, K): total
frames/s, p50/p95 latency from the ingress's hand-off to receipt (the header's time stamp; on Ray it is taken
when the frame reaches the ingress), p95 of the replica → ingress hop, and frames the clients missed. Then, with 2
replicas and --kill-sessions sessions streaming at --kill-fps, the replica of the first session is killed
(ray.kill) and the recovery time of each session it served is measured as the longest pause between two frames
at the client minus one frame period (and by the ingress, failure → next frame); no frame may be missed.

    python benchmarks/bench_serve_ray.py [--preset lia-128] [--clients 1,2,4,8] [--replicas 1,2] [--json out.json]

Scaling from 1 to 2 replicas needs a core per replica beyond what the ingress, Ray's proxy and the JPEG encoding
use: on a 2-core machine they all share the same two cores, so the table shows what this machine can show.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

import httpx

HEADER = struct.Struct("<Qd")  # leo_rt.serve.app.HEADER: sequence number, render time (Unix s)


def portrait() -> bytes:
    from PIL import Image

    from leo_rt.pipelines import find_shared_data, synthetic_portrait

    data = find_shared_data()
    if data is not None:
        return (data / "vox" / "mona_lisa.png").read_bytes()
    buf = io.BytesIO()
    Image.fromarray(synthetic_portrait(128)).save(buf, format="PNG")
    return buf.getvalue()


def create(url: str, image: bytes, seed: int, steps: int, fps: float) -> dict:
    r = httpx.post(
        f"{url}/v1/sessions",
        files={"image": ("face.png", image, "image/png")},
        data={"motion": "lmdm", "steps": str(steps), "seed": str(seed), "fps": str(fps)},
        timeout=120,
    )
    r.raise_for_status()
    return r.json()


async def client(url: str, sid: str, t_start: float, t_end: float) -> dict:
    """Frames received between t_start and t_end: count, latencies, sequence gaps, receipt times."""
    import websockets

    ws_url = url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream"
    frames, delays, gaps, last_seq, times = 0, [], 0, None, []
    async with websockets.connect(ws_url, max_size=2**24) as ws:
        while True:
            msg = await ws.recv()
            if isinstance(msg, str):
                continue
            now = time.time()
            seq, t_render = HEADER.unpack_from(msg)
            if now >= t_end:
                break
            if now >= t_start:
                frames += 1
                delays.append(now - t_render)
                times.append(now)
                if last_seq is not None:
                    gaps += seq - last_seq - 1
            last_seq = seq
        info = httpx.get(f"{url}/v1/sessions/{sid}", timeout=30).json()
        await ws.send(json.dumps({"type": "stop"}))
    return {"frames": frames, "delays": delays, "missed": gaps, "times": times, "info": info}


def quantile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def run_k(url: str, k: int, args, image: bytes) -> dict:
    ids = []
    for i in range(k):
        ids.append(create(url, image, i, args.steps, 1000)["id"])
        time.sleep(1.0)  # routing spreads new sessions once it knows where the last ones went

    async def all_clients():
        t0 = time.time()
        t_start, t_end = t0 + args.warmup, t0 + args.warmup + args.seconds
        return await asyncio.gather(*(client(url, sid, t_start, t_end) for sid in ids))

    results = asyncio.run(all_clients())
    delays = [d for r in results for d in r["delays"]]
    hops = [r["info"]["cluster"]["hop_ms"]["p95"] for r in results if r["info"]["cluster"]["hop_ms"]["p95"]]
    replicas = {rep for r in results for rep in r["info"]["cluster"]["frames_by_replica"]}
    per = [r["frames"] / args.seconds for r in results]
    return {
        "k": k,
        "total_fps": sum(per),
        "min_session_fps": min(per),
        "p50_ms": 1e3 * quantile(delays, 0.5),
        "p95_ms": 1e3 * quantile(delays, 0.95),
        "hop_p95_ms": max(hops) if hops else float("nan"),
        "missed": sum(r["missed"] for r in results),
        "replicas_used": len(replicas),
    }


def run_kill(url: str, args, image: bytes) -> dict:
    import ray

    sessions = []
    for i in range(args.kill_sessions):
        sessions.append(create(url, image, 100 + i, args.steps, args.kill_fps))
        time.sleep(1.0)
    victim = sessions[0]["cluster"]["replica"]

    async def all_clients():
        t0 = time.time()
        tasks = [
            asyncio.ensure_future(client(url, s["id"], t0 + 1.0, t0 + 1.0 + args.kill_after + args.kill_watch))
            for s in sessions
        ]
        await asyncio.sleep(1.0 + args.kill_after)
        t_kill = time.time()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        )
        return t_kill, await asyncio.gather(*tasks)

    t_kill, results = asyncio.run(all_clients())
    period = 1.0 / args.kill_fps
    rows = []
    for s, r in zip(sessions, results, strict=True):
        stats = r["info"]["cluster"]
        print(
            f"kill: session {s['id'][:8]} opened on {s['cluster']['replica'][-8:]}, frames by replica "
            f"{ {k[-8:]: v for k, v in stats['frames_by_replica'].items()} }",
            flush=True,
        )
        if victim not in stats["frames_by_replica"]:
            continue
        after = [t for t in r["times"] if t >= t_kill]
        gaps = [b - a for a, b in zip(r["times"], r["times"][1:], strict=False) if b >= t_kill]
        rows.append(
            {
                "session": s["id"],
                "client_gap_s": max(gaps) - period if gaps else float("nan"),
                "ingress_s": max(stats["recoveries_s"]) if stats["recoveries_s"] else float("nan"),
                "frames_after_kill": len(after),
                "missed": r["missed"],
            }
        )
    return {"victim": victim, "sessions": rows, "period_s": period}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="lia-128", help="animator shape, random weights (default: lia-128)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--lmdm", default=None, help="LMDM directory (default: an untrained lmdm-small)")
    p.add_argument("--clients", default="1,2,4,8", help="numbers of concurrent clients (default: 1,2,4,8)")
    p.add_argument("--replicas", default="1,2", help="renderer replica counts (default: 1,2)")
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per K (default: 6)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring, per K (default: 3)")
    p.add_argument("--batch", type=int, default=4, help="frames per render request of a session (default: 4)")
    p.add_argument("--steps", type=int, default=5, help="LMDM sampling steps (default: 5)")
    p.add_argument("--kill-sessions", type=int, default=4, help="sessions streaming when a replica is killed (4)")
    p.add_argument("--kill-fps", type=float, default=25.0, help="their fps (default: 25)")
    p.add_argument("--kill-after", type=float, default=3.0, help="seconds of streaming before the kill (3)")
    p.add_argument("--kill-watch", type=float, default=6.0, help="seconds of streaming after it (6)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",")]
    counts = [int(x) for x in args.replicas.split(",")]

    import ray
    from ray import serve

    from leo_rt.serve.cluster import ClusterConfig, run_cluster
    from leo_rt.serve.config import ServeConfig

    image = portrait()
    cpus = os.cpu_count() or 1
    print(
        f"# bench_serve_ray: {args.preset} on {args.device} ({args.backend}), {cpus} CPUs "
        f"({platform.processor() or platform.machine()}), ray {ray.__version__}, LMDM {args.steps} steps, "
        f"{args.batch} frames per request, 1 torch thread per replica",
        flush=True,
    )
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows, kill = [], None
    port = free_port()  # Serve's proxy keeps the port it started with
    try:
        for r in counts:
            config = ClusterConfig(
                lmdm=args.lmdm,
                preset=args.preset,
                device=args.device,
                backend=args.backend,
                replicas=r,
                torch_threads=1,
                sessions_per_replica=max(args.clients),
                max_wait_ms=2.0,
                serve=ServeConfig(
                    port=port,
                    max_sessions=max(max(args.clients), args.kill_sessions),
                    max_fps=1000.0,
                    batch=args.batch,
                    idle_timeout_s=600,
                ),
            )
            t0 = time.monotonic()
            run_cluster(config, block=False, log=lambda s: None)
            url = f"http://127.0.0.1:{port}"
            print(f"R={r}: application up in {time.monotonic() - t0:.0f} s", flush=True)
            for k in args.clients:
                row = {"replicas": r, **run_k(url, k, args, image)}
                rows.append(row)
                print(
                    f"R={r} K={k}  total {row['total_fps']:6.2f} fps (min session {row['min_session_fps']:.2f})  "
                    f"p50 {row['p50_ms']:6.1f} ms  p95 {row['p95_ms']:6.1f} ms  hop p95 {row['hop_p95_ms']:6.1f} ms  "
                    f"missed {row['missed']}  replicas used {row['replicas_used']}",
                    flush=True,
                )
            if r >= 2:
                kill = run_kill(url, args, image)
                for s in kill["sessions"]:
                    print(
                        f"kill: session {s['session'][:8]} recovered in {s['client_gap_s']:.2f} s at the client "
                        f"({s['ingress_s']:.2f} s at the ingress), {s['frames_after_kill']} frames after, "
                        f"missed {s['missed']}",
                        flush=True,
                    )
            serve.delete("leo_rt")
    finally:
        serve.shutdown()
        ray.shutdown()

    print()
    print("| renderer replicas | sessions K | total fps | min session fps | p50 ms | p95 ms | hop p95 ms | missed |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['replicas']} | {r['k']} | {r['total_fps']:.2f} | {r['min_session_fps']:.2f} | {r['p50_ms']:.0f} "
            f"| {r['p95_ms']:.0f} | {r['hop_p95_ms']:.0f} | {r['missed']} |"
        )
    if kill and kill["sessions"]:
        gaps = [s["client_gap_s"] for s in kill["sessions"]]
        print()
        print(
            f"Replica killed mid-stream ({args.kill_sessions} sessions at {args.kill_fps:g} fps, "
            f"{len(gaps)} on the killed replica): recovery {statistics.mean(gaps):.2f} s mean, {max(gaps):.2f} s "
            f"max at the client; frames missed: {sum(s['missed'] for s in kill['sessions'])}"
        )
    result = {
        "args": vars(args),
        "rows": rows,
        "kill": kill,
        "cpus": cpus,
        "date": time.strftime("%F"),
        "python": sys.version.split()[0],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
