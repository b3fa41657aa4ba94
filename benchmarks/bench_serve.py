"""Serve load benchmark: K concurrent WebSocket clients of one `leo-rt serve` on this machine, with cross-session
batching on and off, in one run.

A server process is started for each mode (`python -m leo_rt.serve`, random weights of --preset, untrained
lmdm-small unless --lmdm): "batched" coalesces the render requests of all sessions into one call (up to
--max-batch frames); "per-session" caps a call at one request (max batch = --batch, the frames per request), so
every session's frames are rendered by a call of their own. Sampling is coalesced in both modes up to that cap.
For K = 1, 2, 4, 8 (--clients), K LMDM sessions stream JPEG frames at --fps each (25 by default, the page's;
where the server cannot keep up, as fast as it renders), after a warm-up, for --seconds. Reported per (mode, K):
total and per-session frames/s, p50/p95 render → receipt latency (server render stamp vs client clock, same
machine), frames the clients missed (sequence gaps: dropped because they lagged), frames per render call, and
the server's peak RSS (VmHWM, cumulative over the run). Both servers stay up and the runs alternate between them
(--reps each, the median run shown with every run's total), so a drifting machine load hits both modes alike.
Then the gain of batching (total frames/s, batched / per-session) per K.

    python benchmarks/bench_serve.py [--preset lia-128] [--clients 1,2,4,8] [--seconds 8] [--json out.json]

With --ray, `leo-rt serve --ray` with 1 and 2 renderer replicas (--replicas) instead, and the recovery time after
a replica is killed. For each replica count the application (leo_rt.serve.cluster: ingress, renderer × R, session
store) runs on a local Ray cluster of this machine's CPUs; each renderer replica uses one torch thread, so R
replicas have R threads of compute. K LMDM sessions stream JPEG frames as fast as the replicas render them (--fps
far above capacity, 1000 by default: a throughput test) for --seconds (6 by default) after --warmup. Reported per
(R, K): total frames/s, p50/p95 latency from the ingress's hand-off to receipt (the header's time stamp; on Ray it
is taken when the frame reaches the ingress), p95 of the replica → ingress hop, and frames the clients missed.
Then, with 2 replicas and --kill-sessions sessions streaming at --kill-fps, the replica of the first session is
killed (ray.kill) and the recovery time of each session it served is measured as the longest pause between two
frames at the client minus one frame period (and by the ingress, failure → next frame); no frame may be missed.

    python benchmarks/bench_serve.py --ray [--preset lia-128] [--clients 1,2,4,8] [--replicas 1,2] [--json out.json]

Scaling from 1 to 2 replicas needs a core per replica beyond what the ingress, Ray's proxy and the JPEG encoding
use: on a 2-core machine they all share the same two cores, so the table shows what this machine can show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import struct
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

HEADER = struct.Struct("<Qd")  # leo_rt.serve.app.HEADER: sequence number, render time (Unix s)


@contextmanager
def server_process(args, max_batch: int):
    cmd = [
        sys.executable, "-m", "leo_rt.serve", "--preset", args.preset, "--device", args.device,
        "--backend", args.backend, "--host", "127.0.0.1", "--port", "0", "--max-sessions", str(max(args.clients)),
        "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--batch", str(args.batch),
        "--max-fps", "1000", "--idle-timeout", "600", "--log-level", "warning",
    ]  # fmt: skip
    if args.lmdm:
        cmd += ["--lmdm", args.lmdm]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 120
        while url is None:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("the server exited:\n" + "".join(lines))
            lines.append(line)
            m = re.search(r"leo-rt serve: (http://\S+?)/ ", line)
            url = m.group(1) if m else None
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 120 s:\n" + "".join(lines))
        while True:  # listening once /healthz answers
            try:
                httpx.get(f"{url}/healthz", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=60).text
    got = {k: float(v) for k, v in re.findall(r"^leo_rt_render_batch_frames_(sum|count) (\S+)$", text, re.M)}
    return got.get("sum", 0.0), got.get("count", 0.0)


class Window:
    """The measured window, shared by the clients of one run: frames count from `open()` until `close()`."""

    def __init__(self, k: int):
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.closed = False
        self.seen = [0] * k  # frames received, in the window or not
        self.times: list[list[float]] = [[] for _ in range(k)]  # receipt times of the frames in the window
        self.missed = [0] * k  # sequence gaps in the window: frames dropped because the client lagged
        self.delays: list[float] = []  # render → receipt, every client's
        self.info: list[dict | None] = [None] * k  # each session's info once closed (taken before the stop)

    def open(self) -> None:
        self.t_start = time.time()

    def close(self) -> None:
        if not self.closed:
            self.t_end, self.closed = time.time(), True

    @property
    def seconds(self) -> float:
        return self.t_end - self.t_start

    def fps(self) -> list[float]:
        return [len(t) / self.seconds for t in self.times]


async def client(url: str, sid: str, i: int, w: Window) -> None:
    import websockets

    ws_url = url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream"
    last_seq = None
    async with websockets.connect(ws_url, max_size=2**24) as ws:
        while not w.closed:
            try:
                msg = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            if isinstance(msg, str):
                continue
            now = time.time()
            seq, t_render = HEADER.unpack_from(msg)
            w.seen[i] += 1
            if w.t_start is not None and not w.closed:
                w.times[i].append(now)
                w.delays.append(now - t_render)
                if last_seq is not None:
                    w.missed[i] += seq - last_seq - 1
            last_seq = seq
        async with httpx.AsyncClient() as http:  # before the stop, which closes the session
            w.info[i] = (await http.get(f"{url}/v1/sessions/{sid}", timeout=30)).json()
        await ws.send(json.dumps({"type": "stop"}))


def open_sessions(url: str, image: bytes, args, seeds, fps: float, pause: float = 0.0) -> list[dict]:
    """LMDM sessions, `pause` seconds after each (on Ray, routing spreads new sessions once it knows where the
    last ones went)."""
    sessions = []
    for seed in seeds:
        r = httpx.post(
            f"{url}/v1/sessions",
            files={"image": ("face.png", image, "image/png")},
            data={"motion": "lmdm", "steps": str(args.steps), "seed": str(seed), "fps": str(fps)},
            timeout=120,
        )
        r.raise_for_status()
        sessions.append(r.json())
        time.sleep(pause)
    return sessions


def watch(url: str, sessions: list[dict], schedule):
    """One client per session while the coroutine `schedule(window)` opens and closes the window; the window and
    what schedule returned."""

    async def run():
        w = Window(len(sessions))
        tasks = [asyncio.ensure_future(client(url, s["id"], i, w)) for i, s in enumerate(sessions)]
        try:
            return w, await schedule(w)
        finally:
            w.close()
            await asyncio.gather(*tasks)

    return asyncio.run(run())


def quantile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def run_k(url: str, pid: int, k: int, args, image: bytes) -> dict:
    """The window opens once every client has its first frames (the pipeline is primed), closes after --seconds
    once every client has --min-frames in it, or at --max-seconds."""
    sessions = open_sessions(url, image, args, range(k), args.fps)

    async def schedule(w: Window):
        loop = asyncio.get_running_loop()
        t0 = time.time()
        while (min(w.seen) < args.batch or time.time() - t0 < args.warmup) and time.time() - t0 < args.max_seconds:
            await asyncio.sleep(0.05)
        before = await loop.run_in_executor(None, batch_stats, url)
        w.open()
        while True:
            elapsed = time.time() - w.t_start
            if (elapsed >= args.seconds and min(map(len, w.times)) >= args.min_frames) or elapsed >= args.max_seconds:
                break
            await asyncio.sleep(0.05)
        w.close()
        return before, await loop.run_in_executor(None, batch_stats, url)

    w, (before, after) = watch(url, sessions, schedule)
    per = w.fps()
    calls = after[1] - before[1]
    return {
        "k": k,
        "total_fps": sum(per),
        "per_session_fps": statistics.mean(per),
        "min_session_fps": min(per),
        "p50_ms": 1e3 * quantile(w.delays, 0.5),
        "p95_ms": 1e3 * quantile(w.delays, 0.95),
        "missed": sum(w.missed),
        "window_s": w.seconds,
        "frames_per_call": (after[0] - before[0]) / calls if calls else float("nan"),
        "peak_rss_mb": peak_rss_mb(pid),
    }


def fmt_runs(row: dict) -> str:
    return ", ".join(f"{x:.1f}" for x in row["total_fps_runs"])


def portrait(size: int) -> bytes:
    import io

    from PIL import Image

    from leo_rt.pipelines import find_shared_data, synthetic_portrait

    data = find_shared_data()
    if data is not None:
        return (data / "vox" / "mona_lisa.png").read_bytes()
    buf = io.BytesIO()
    Image.fromarray(synthetic_portrait(size)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------- Ray


def run_k_ray(url: str, k: int, args, image: bytes) -> dict:
    sessions = open_sessions(url, image, args, range(k), args.fps, pause=1.0)

    async def schedule(w: Window):
        await asyncio.sleep(args.warmup)
        w.open()
        await asyncio.sleep(args.seconds)

    w, _ = watch(url, sessions, schedule)
    clusters = [info["cluster"] for info in w.info]
    hops = [c["hop_ms"]["p95"] for c in clusters if c["hop_ms"]["p95"]]
    per = w.fps()
    return {
        "k": k,
        "total_fps": sum(per),
        "min_session_fps": min(per),
        "p50_ms": 1e3 * quantile(w.delays, 0.5),
        "p95_ms": 1e3 * quantile(w.delays, 0.95),
        "hop_p95_ms": max(hops) if hops else float("nan"),
        "missed": sum(w.missed),
        "replicas_used": len({rep for c in clusters for rep in c["frames_by_replica"]}),
    }


def run_kill(url: str, args, image: bytes) -> dict:
    import ray

    sessions = open_sessions(url, image, args, range(100, 100 + args.kill_sessions), args.kill_fps, pause=1.0)
    victim = sessions[0]["cluster"]["replica"]

    async def schedule(w: Window) -> float:
        t0 = time.time()
        await asyncio.sleep(1.0)
        w.open()
        await asyncio.sleep(args.kill_after)
        t_kill = time.time()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        )
        await asyncio.sleep(max(0.0, t0 + 1.0 + args.kill_after + args.kill_watch - time.time()))
        return t_kill

    w, t_kill = watch(url, sessions, schedule)
    period = 1.0 / args.kill_fps
    rows = []
    for i, s in enumerate(sessions):
        stats, times = w.info[i]["cluster"], w.times[i]
        print(
            f"kill: session {s['id'][:8]} opened on {s['cluster']['replica'][-8:]}, frames by replica "
            f"{ {k[-8:]: v for k, v in stats['frames_by_replica'].items()} }",
            flush=True,
        )
        if victim not in stats["frames_by_replica"]:
            continue
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b >= t_kill]
        rows.append(
            {
                "session": s["id"],
                "client_gap_s": max(gaps) - period if gaps else float("nan"),
                "ingress_s": max(stats["recoveries_s"]) if stats["recoveries_s"] else float("nan"),
                "frames_after_kill": sum(t >= t_kill for t in times),
                "missed": w.missed[i],
            }
        )
    return {"victim": victim, "sessions": rows, "period_s": period}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_ray(args) -> dict:
    import ray
    from ray import serve

    from leo_rt.serve.cluster import ClusterConfig, run_cluster
    from leo_rt.serve.config import ServeConfig

    counts = [int(x) for x in args.replicas.split(",")]
    image = portrait(128)
    cpus = os.cpu_count() or 1
    print(
        f"# bench_serve --ray: {args.preset} on {args.device} ({args.backend}), {cpus} CPUs "
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
                max_wait_ms=args.max_wait_ms,
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
                row = {"replicas": r, **run_k_ray(url, k, args, image)}
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
    return {
        "args": vars(args),
        "rows": rows,
        "kill": kill,
        "cpus": cpus,
        "date": time.strftime("%F"),
        "python": sys.version.split()[0],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="lia-128", help="animator shape, random weights (default: lia-128)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--lmdm", default=None, help="LMDM directory (default: an untrained lmdm-small)")
    p.add_argument("--clients", default="1,2,4,8", help="numbers of concurrent clients (default: 1,2,4,8)")
    p.add_argument("--ray", action="store_true", help="benchmark `leo-rt serve --ray` on a local Ray cluster")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per K, at least (default: 8; 6 --ray)")
    p.add_argument("--min-frames", type=int, default=8, help="frames every session gets in the window (default: 8)")
    p.add_argument("--max-seconds", type=float, default=90.0, help="cap of warm-up and of the window (default: 90)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring, per K, at least (default: 3)")
    p.add_argument("--batch", type=int, default=4, help="frames per render request of a session (default: 4)")
    p.add_argument("--max-batch", type=int, default=64, help="frames per call when batching (default: 64)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="wait for company when batching (default: 2)")
    p.add_argument("--steps", type=int, default=5, help="LMDM sampling steps (default: 5)")
    p.add_argument("--fps", type=float, default=25.0, help="each session's fps (default: 25, the page's; 1000 --ray)")
    p.add_argument("--modes", default="batched,per-session", help="batched, per-session or both (default)")
    p.add_argument("--reps", type=int, default=2, help="runs per (mode, K), interleaved; the median is shown (2)")
    p.add_argument("--replicas", default="1,2", help="--ray: renderer replica counts (default: 1,2)")
    p.add_argument("--kill-sessions", type=int, default=4, help="--ray: sessions streaming at the kill (4)")
    p.add_argument("--kill-fps", type=float, default=25.0, help="--ray: their fps (default: 25)")
    p.add_argument("--kill-after", type=float, default=3.0, help="--ray: seconds of streaming before the kill (3)")
    p.add_argument("--kill-watch", type=float, default=6.0, help="--ray: seconds of streaming after it (6)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.ray:  # a throughput test: sessions ask for more frames than the replicas render
        p.set_defaults(seconds=6.0, fps=1000.0)
        args = p.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",")]
    result = main_ray(args) if args.ray else main_local(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main_local(args) -> dict:
    modes = {"batched": args.max_batch, "per-session": args.batch}
    chosen = [m.strip() for m in args.modes.split(",")]
    image = portrait(128)
    rows = []
    cpu = platform.processor() or platform.machine()
    print(
        f"# bench_serve: {args.preset} on {args.device} ({args.backend}), {os.cpu_count()} CPUs ({cpu}), "
        f"LMDM {args.steps} steps, {args.batch} frames per request, {args.fps:g} fps per session asked"
    )
    with ExitStack() as stack:  # both servers up at once, runs interleaved: a drifting machine load hits both
        servers = {mode: stack.enter_context(server_process(args, modes[mode])) for mode in chosen}
        for k in args.clients:
            runs: dict[str, list[dict]] = {mode: [] for mode in chosen}
            for _ in range(args.reps):
                for mode in chosen:
                    url, pid = servers[mode]
                    runs[mode].append(run_k(url, pid, k, args, image))
            for mode in chosen:
                rs = sorted(runs[mode], key=lambda r: r["total_fps"])
                row = {"mode": mode, **rs[len(rs) // 2], "total_fps_runs": [r["total_fps"] for r in runs[mode]]}
                rows.append(row)
                print(
                    f"{mode:>11}  K={k}  total {row['total_fps']:6.2f} fps (runs {fmt_runs(row)})  per session "
                    f"{row['per_session_fps']:6.2f} (min {row['min_session_fps']:.2f})  p50 {row['p50_ms']:7.1f} ms  "
                    f"p95 {row['p95_ms']:7.1f} ms  missed {row['missed']:3d}  "
                    f"frames/call {row['frames_per_call']:5.2f}  peak RSS {row['peak_rss_mb']:6.0f} MB",
                    flush=True,
                )
    print()
    print(
        "| mode | K | total fps (median; runs) | per-session fps (min) | p50 ms | p95 ms | missed | frames/call "
        "| peak RSS MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['k']} | {r['total_fps']:.2f} ({fmt_runs(r)}) | {r['per_session_fps']:.2f} "
            f"({r['min_session_fps']:.2f}) | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['missed']} "
            f"| {r['frames_per_call']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    by = {(r["mode"], r["k"]): r for r in rows}
    gains = {
        k: by[("batched", k)]["total_fps"] / by[("per-session", k)]["total_fps"]
        for k in args.clients
        if ("batched", k) in by and ("per-session", k) in by and by[("per-session", k)]["total_fps"] > 0
    }
    if gains:
        print()
        print("| K | batching gain (total fps, batched / per-session) |")
        print("|---:|---:|")
        for k, g in gains.items():
            print(f"| {k} | {g:.2f}× |")
    return {"args": vars(args), "rows": rows, "gain": gains, "cpus": os.cpu_count(), "date": time.strftime("%F")}


if __name__ == "__main__":
    main()
