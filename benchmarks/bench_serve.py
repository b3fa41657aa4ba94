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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
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
    """The measured window, shared by the clients: opens once every client has its first frames (the pipeline
    is primed), closes after --seconds once every client has --min-frames in it, or at --max-seconds."""

    def __init__(self, k: int):
        self.seen = [0] * k
        self.t_start: float | None = None
        self.closed = False
        self.frames = [0] * k
        self.delays: list[float] = []
        self.missed = 0


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
                w.frames[i] += 1
                w.delays.append(now - t_render)
                if last_seq is not None:
                    w.missed += seq - last_seq - 1
            last_seq = seq
        await ws.send(json.dumps({"type": "stop"}))


def run_k(url: str, pid: int, k: int, args, image: bytes) -> dict:
    ids = []
    for i in range(k):
        r = httpx.post(
            f"{url}/v1/sessions",
            files={"image": ("face.png", image, "image/png")},
            data={"motion": "lmdm", "steps": str(args.steps), "seed": str(i), "fps": str(args.fps)},
            timeout=120,
        )
        r.raise_for_status()
        ids.append(r.json()["id"])

    async def all_clients():
        w = Window(k)
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(client(url, sid, i, w)) for i, sid in enumerate(ids)]
        t0 = time.time()
        while (min(w.seen) < args.batch or time.time() - t0 < args.warmup) and time.time() - t0 < args.max_seconds:
            await asyncio.sleep(0.05)
        before = await loop.run_in_executor(None, batch_stats, url)
        w.t_start = time.time()
        while True:
            elapsed = time.time() - w.t_start
            if (elapsed >= args.seconds and min(w.frames) >= args.min_frames) or elapsed >= args.max_seconds:
                break
            await asyncio.sleep(0.05)
        w.closed, window = True, time.time() - w.t_start
        after = await loop.run_in_executor(None, batch_stats, url)
        await asyncio.gather(*tasks)
        return w, window, before, after

    w, window, before, after = asyncio.run(all_clients())
    results = [{"frames": n} for n in w.frames]
    delays = sorted(w.delays)
    per = [r["frames"] / window for r in results]
    calls = after[1] - before[1]
    q = (lambda p: 1e3 * delays[min(len(delays) - 1, int(p * len(delays)))]) if delays else (lambda p: float("nan"))
    return {
        "k": k,
        "total_fps": sum(per),
        "per_session_fps": statistics.mean(per),
        "min_session_fps": min(per),
        "p50_ms": q(0.5),
        "p95_ms": q(0.95),
        "missed": w.missed,
        "window_s": window,
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="lia-128", help="animator shape, random weights (default: lia-128)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--lmdm", default=None, help="LMDM directory (default: an untrained lmdm-small)")
    p.add_argument("--clients", default="1,2,4,8", help="numbers of concurrent clients (default: 1,2,4,8)")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per K, at least (default: 8)")
    p.add_argument("--min-frames", type=int, default=8, help="frames every session gets in the window (default: 8)")
    p.add_argument("--max-seconds", type=float, default=90.0, help="cap of warm-up and of the window (default: 90)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring, per K, at least (default: 3)")
    p.add_argument("--batch", type=int, default=4, help="frames per render request of a session (default: 4)")
    p.add_argument("--max-batch", type=int, default=64, help="frames per call when batching (default: 64)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="wait for company, batched mode (default: 2)")
    p.add_argument("--steps", type=int, default=5, help="LMDM sampling steps (default: 5)")
    p.add_argument("--fps", type=float, default=25.0, help="each session's fps (default: 25, the page's)")
    p.add_argument("--modes", default="batched,per-session", help="batched, per-session or both (default)")
    p.add_argument("--reps", type=int, default=2, help="runs per (mode, K), interleaved; the median is shown (2)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",")]
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
    result = {"args": vars(args), "rows": rows, "gain": gains, "cpus": os.cpu_count(), "date": time.strftime("%F")}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
