#!/usr/bin/env python3
"""The one-shot GPU check of leo_rt: correctness first, then timings, one JSON file, a PASS/FAIL table last.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget 300]      # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --rehearse [--out rehearsal.json]           # the CPU rehearsal (CI runs it)

Steps (issue "The GPU path, correct before it meets a GPU", and its GPU-run issue's goals):
  0 preflight   device and capability, versions, compilers, Python.h, CUDA toolkit, TF32 state, backends
  1 kernels     the warp kernel through leo_rt.kernels.warp_blend: fp32/fp16/bf16, NCHW and channels-last,
                shared / per-frame / indexed sources, every decoder map size of the 256 model, batch 1/8/32,
                against a float64 reference (bound: 2× the PyTorch composition's own error in that dtype, at
                least 2 roundings of the output or 1e-5 of its largest value); NaN/inf logits; the int32 and
                launch-limit guards
  2 custom_op   opcheck of leo_rt::warp_blend, torch.compile(fullgraph=True) with and without CUDA graphs vs
                eager, outputs of a replay not silently overwritten, torch.export keeps one op node
  3 renderer    fast form vs the published form at 256, kernels on and off, fp32/tf32/fp16/bf16, each against
                the float64 network (bound: 2× the published form's own error, or 1e-5)
  4 stream      the compile backend (CUDA graphs) under Session.stream: the reenact and generate patterns, each
                twice; bucket padding, splitting, replay outputs kept; the serve core: two sources in one
                batched render against single-source renders
  5 aoti        one AOTInductor CUDA package of the renderer (tiny preset, dynamic batch): export, load, compare
  6 timings     render ms/frame at 256, eager fp16/bf16 and compiled fp16 (CUDA graphs) at batch 1/8/32; the
                warp kernel vs the PyTorch composition (batch 8, fp16) against the measured copy bandwidth; one
                LMDM chunk (64 codes, 25 DDIM steps) eager and with its step loop in a CUDA graph; `generate` at
                256 end to end into a null sink; the published call pattern (LIA.forward) in the same run
  7 tensorrt    TensorRT engines, or that TensorRT is not installed

How it runs. Every step runs in its own Python process, on a GPU started fresh (never forked: a process that touched
CUDA cannot fork safely; the rehearsal forks a parent that has imported leo_rt, to save the imports). A step that
overruns its time limit is killed with its whole process group (Inductor's compile workers too), recorded, and the
check moves on; so is a step that crashes (a CUDA error is sticky for its process, so it cannot poison the next
step). A thread with a deadline could not do this: a hung kernel or compile cannot be interrupted from Python. Each
check a step makes is appended to a JSON-lines file the moment it ends, and the parent rewrites the JSON file every
few seconds and after every step, so a run cut short still leaves its results. Checks a step never reached are
UNMEASURED, never PASS. The time budget (--budget, default 300 s for a cold H100) keeps at least 120 s for the
timings (60 s of the rehearsal's 480 s). Autotuning sweeps are off (LEO_RT_AUTOTUNE=0): the kernel's first
configuration per layout runs. Only batches 1, 8 and 32 are compiled, in fp16.

The rehearsal (--rehearse) runs every step's code on the CPU: CPU tensors, Triton's interpreter, the tiny
presets, few sizes. torch.compile runs with the aot_eager backend there (Inductor's code generation is what a
GPU run checks; compiling it for the CPU would take minutes). What needs CUDA (CUDA graphs, device kernels'
timings, CUDA AOTInductor, TensorRT) is listed NEEDS-GPU, so green is never mistaken for verified. Exit status:
0 when no check failed, 1 otherwise.

Works from a checkout (`python benchmarks/gpu_check.py` or with PYTHONPATH=.) and installed: it imports the
leo_rt of the tree it sits in. Needs nothing the GPU image lacks (no PyAV: `generate` is timed into a null sink).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if (REPO / "leo_rt" / "__init__.py").is_file() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this tree's leo_rt, installed or not

SCHEMA = "leo_rt.gpu_check/1"
PASS, FAIL, UNMEASURED, NEEDS_GPU = "PASS", "FAIL", "UNMEASURED", "NEEDS-GPU"
TIMINGS_RESERVE_S = {False: 120.0, True: 60.0}  # (by rehearsal) what the correctness steps leave to the timings
MIN_STEP_S = 10.0  # a step is not started with less than this left


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: float  # on a GPU; the rehearsal uses rehearse_s
    rehearse_s: float
    timing: bool = False


STEPS = (
    Step("preflight", 45, 60),
    Step("kernels", 75, 90),
    Step("custom_op", 75, 90),
    Step("renderer", 60, 90),
    Step("stream", 110, 120),
    Step("aoti", 100, 90),
    Step("timings", 170, 120, timing=True),
    Step("tensorrt", 30, 60),
)

# The goals of the GPU-run issue (256², fp16): key numbers of the timings step and how each is judged.
GOALS = (
    ("render b1 fp16, CUDA graphs", "compile_fp16_b1_ms", "<=", 2.0, "ms/frame"),
    ("render b32 fp16", "best_fp16_b32_fps", ">=", 3000.0, "frames/s"),
    ("warp fused vs composition, b8 fp16", "warp_b8_fp16_speedup", ">=", 2.0, "×"),
    ("warp fused, b8 fp16, of copy bandwidth", "warp_b8_fp16_fraction_of_copy", ">=", 0.60, "of copy"),
    ("LMDM chunk 64 codes, 25 DDIM, CUDA graph", "lmdm_chunk_graph_ms", "<=", 10.0, "ms"),
    ("generate at 256 end to end", "generate_fps", ">", 25.0, "frames/s"),
)


# ============================================================================================== the parent


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _read_records(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def _step_status(checks: list[dict]) -> str:
    statuses = {c["status"] for c in checks}
    for s in (FAIL, PASS, NEEDS_GPU):
        if s in statuses:
            return s
    return UNMEASURED


def _summarise(records: list[dict]) -> tuple[list[dict], list[str], dict]:
    """(checks, planned names, info) of one step's records."""
    checks = [r for r in records if r.get("kind") == "check"]
    planned: list[str] = []
    info: dict = {}
    for r in records:
        if r.get("kind") == "plan":
            planned += [n for n in r["names"] if n not in planned]
        elif r.get("kind") == "info":
            info.update(r["info"])
    return checks, planned, info


def _tail(path: Path, n: int = 40) -> list[str]:
    if not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()[-n:]


class Report:
    """The JSON document, rewritten atomically."""

    def __init__(self, path: Path, rehearse: bool, budget: float):
        self.path = path
        self.doc = {
            "schema": SCHEMA,
            "mode": "rehearsal" if rehearse else "gpu",
            "started": _now(),
            "budget_s": budget,
            "argv": sys.argv[1:],
            "machine": {},
            "steps": {},
            "goals": [],
            "summary": {},
        }

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def _child_env(rehearse: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("LEO_RT_AUTOTUNE", "0")  # no autotuning sweeps in the check (CLARIFICATIONS §3)
    if rehearse:
        env["TRITON_INTERPRET"] = "1"  # before anything imports triton
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal never uses a GPU, even where one is
    return env


class _Exec:
    """A step in a fresh Python process (the GPU run's way: nothing inherited, no CUDA state to fork)."""

    def __init__(self, step: str, rehearse: bool, work: Path, log: Path):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--work", str(work)]
        cmd += ["--rehearse"] if rehearse else []
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_child_env(rehearse),
                                         cwd=str(work), start_new_session=True)  # fmt: skip
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self) -> int:
        return self.proc.wait()


class _Fork:
    """A step in a fork of this process, which has imported torch and leo_rt already (the rehearsal's way, on the
    CPU only: it saves each step the imports). The child leads its own process group, as an exec'd one does."""

    def __init__(self, step: str, rehearse: bool, work: Path, log: Path):
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid, self.rc = os.fork(), None
        if self.pid == 0:  # the child: never returns
            code = 1
            try:
                os.setsid()
                fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                os.chdir(work)
                code = main_step(argparse.Namespace(step=step, rehearse=rehearse, work=str(work)))
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)

    def poll(self) -> int | None:
        if self.rc is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.rc = os.waitstatus_to_exitcode(status)
        return self.rc

    def wait(self) -> int:
        if self.rc is None:
            self.rc = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.rc


def _preload_for_fork() -> None:
    """The rehearsal's environment, then the imports every step makes (before any fork)."""
    os.environ.update({k: v for k, v in _child_env(True).items() if k != "PYTHONPATH"})
    import torch  # noqa: F401

    import leo_rt  # noqa: F401
    import leo_rt.backends  # noqa: F401
    import leo_rt.export  # noqa: F401
    import leo_rt.kernels.warp_triton  # noqa: F401


def run_step(step: Step, limit: float, rehearse: bool, work: Path, report: Report, echo, spawn: str = "exec") -> dict:
    """Run one step in its own process (own process group), at most `limit` seconds; its result dict."""
    records, log = work / f"{step.name}.jsonl", work / f"{step.name}.log"
    for p in (records, log):
        p.unlink(missing_ok=True)
    t0 = time.monotonic()
    timed_out = False
    entry = {"status": UNMEASURED, "limit_s": round(limit, 1), "checks": [], "started": _now()}
    report.doc["steps"][step.name] = entry
    proc = (_Fork if spawn == "fork" else _Exec)(step.name, rehearse, work, log)
    shown, last_write = 0, 0.0
    while proc.poll() is None:
        time.sleep(0.2)
        shown = _echo_new(log, shown, echo)
        if time.monotonic() - t0 > limit:
            timed_out = True
            break
        if time.monotonic() - last_write > 5:  # a run cut short from outside still leaves its results
            entry["checks"] = _summarise(_read_records(records))[0]
            report.write()
            last_write = time.monotonic()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the step's leftovers too (compile workers), also after a clean end
    returncode = proc.wait()
    shown = _echo_new(log, shown, echo)
    wall = time.monotonic() - t0
    checks, planned, info = _summarise(_read_records(records))
    done = {c["name"] for c in checks}
    if timed_out:
        checks.append(_rec(FAIL, "time limit", f"overran its {limit:.0f} s limit and was stopped; see the log tail"))
    elif returncode != 0 and not any(c["name"] == "step" for c in checks):
        checks.append(_rec(FAIL, "step", f"the step process exited with status {returncode}; see the log tail"))
    for name in planned:
        if name not in done:
            checks.append(_rec(UNMEASURED, name, "not reached (the step ended or was stopped before it)"))
    entry.update(
        status=_step_status(checks),
        wall_s=round(wall, 1),
        timed_out=timed_out,
        returncode=returncode,
        checks=checks,
        info=info,
    )
    if entry["status"] == FAIL or timed_out:
        entry["log_tail"] = _tail(log)
    return entry


def _echo_new(log: Path, shown: int, echo) -> int:
    if not log.is_file():
        return shown
    with open(log, "rb") as f:
        f.seek(shown)
        data = f.read()
    if data:
        echo(data.decode(errors="replace"), end="")
    return shown + len(data)


def _rec(status: str, name: str, detail: str = "", numbers: dict | None = None, seconds: float = 0.0) -> dict:
    return {"kind": "check", "name": name, "status": status, "detail": detail, "numbers": numbers or {},
            "seconds": round(seconds, 2)}  # fmt: skip


def tensorrt_parent(rehearse: bool) -> dict | None:
    """Step 7 without a process when TensorRT is absent (the common case): it is only a statement."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        return None  # installed: the step process tries it
    status = NEEDS_GPU if rehearse else UNMEASURED
    check = _rec(status, "tensorrt", "TensorRT is not installed here: the tensorrt backend is unmeasured (opt-in)")
    return {"status": status, "limit_s": 0, "wall_s": 0.0, "timed_out": False, "checks": [check], "info": {}}


def goals(report: Report, rehearse: bool) -> list[dict]:
    numbers: dict = {}
    for c in report.doc["steps"].get("timings", {}).get("checks", []):
        numbers.update(c.get("numbers", {}))
    out = []
    for name, key, op, target, unit in GOALS:
        value = numbers.get(key)
        if rehearse:
            status = NEEDS_GPU
        elif value is None:
            status = UNMEASURED
        else:
            ok = {"<=": value <= target, ">=": value >= target, ">": value > target}[op]
            status = PASS if ok else FAIL
        row = {"goal": name, "key": key, "target": f"{op} {target:g} {unit}", "value": value, "status": status}
        frac = numbers.get(key.rsplit("_", 1)[0] + "_fraction_of_peak")
        if frac is not None:
            row["fraction_of_peak"] = frac
        if value is not None and status == FAIL:
            row["missed_by"] = f"{value / target:.2f}× the target" if target else ""
        out.append(row)
    return out


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def print_table(report: Report, echo) -> None:
    doc = report.doc
    m = doc["machine"]
    head = f"leo_rt GPU check ({doc['mode']}) — {m.get('device', '?')}; torch {m.get('torch', '?')}, "
    head += f"triton {m.get('triton', '?')}"
    echo("")
    echo("=" * len(head))
    echo(head)
    echo(f"{'step':<12} {'status':<11} {'time':>7}  key numbers / first problem")
    for name, e in doc["steps"].items():
        checks = e.get("checks", [])
        counts = {s: sum(c["status"] == s for c in checks) for s in (PASS, FAIL, UNMEASURED, NEEDS_GPU)}
        bad = next((c for c in checks if c["status"] == FAIL), None)
        if bad is not None:
            note = f"{bad['name']}: {bad['detail']}"
        else:
            note = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
            keys = e.get("key_numbers") or {}
            if keys:
                note += "; " + ", ".join(f"{k}={_fmt(v)}" for k, v in keys.items())
        wall = e.get("wall_s")
        echo(f"{name:<12} {e['status']:<11} {(f'{wall:.1f}s' if wall is not None else '—'):>7}  {note[:150]}")
    echo(f"{'goal':<42} {'target':<20} {'measured':>12} {'of peak':>8}  status")
    for g in doc["goals"]:
        frac = g.get("fraction_of_peak")
        frac_s = f"{100 * frac:.1f}%" if frac is not None else ""
        echo(f"{g['goal']:<42} {g['target']:<20} {_fmt(g['value']):>12} {frac_s:>8}  {g['status']}")
    nums: dict = {}
    for c in doc["steps"].get("timings", {}).get("checks", []):
        nums.update(c.get("numbers", {}))
    pub = {k[len("published_") : -len("_ms")]: v for k, v in nums.items() if k.startswith("published_")}
    if pub:
        line = ", ".join(f"{k.replace('_', ' ')} {_fmt(v)} ms/frame" for k, v in pub.items())
        fast = nums.get("compile_fp16_b1_ms")
        if fast and "fp16_b1" in pub:
            line += f"; compiled b1 fp16 is {pub['fp16_b1'] / fast:.0f}× faster"
        echo(f"published call pattern (LIA.forward, both images encoded per call), same run: {line}")
    s = doc["summary"]
    echo(f"OVERALL {s['status']}: {s['counts']}; JSON: {report.path}")


def key_numbers(name: str, entry: dict) -> dict:
    nums: dict = {}
    for c in entry.get("checks", []):
        nums.update(c.get("numbers", {}))
    wanted = {
        "kernels": ("worst_kernel_to_bound",),
        "renderer": ("fast_fp32_err", "fast_fp16_err", "published_fp16_err"),
        "stream": ("compiled_fp16_err",),
        "aoti": ("aoti_err", "aoti_b8_ms"),
        "timings": ("compile_fp16_b1_ms", "best_fp16_b32_fps", "published_fp16_b1_ms", "generate_fps"),
    }.get(name, ())
    return {k: nums[k] for k in wanted if k in nums}


def main_parent(args) -> int:
    rehearse = args.rehearse
    out = Path(args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else "gpu_check.json"))
    budget = args.budget if args.budget is not None else (480.0 if rehearse else 300.0)
    report = Report(out.resolve(), rehearse, budget)

    def echo(*a, **kw):
        print(*a, **{**kw, "flush": True})

    only = set(args.only.split(",")) if args.only else None
    limits = dict(kv.split("=") for kv in args.limit.split(",")) if args.limit else {}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="leo_rt_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    spawn = args.spawn or ("fork" if rehearse else "exec")
    if spawn == "fork":
        if not rehearse:
            raise SystemExit("--spawn fork is for the rehearsal only: a process that touched CUDA cannot fork")
        _preload_for_fork()
    report.doc["spawn"] = spawn
    t0 = time.monotonic()
    report.write()
    for step in STEPS:
        if only is not None and step.name not in only:
            continue
        left = budget - (time.monotonic() - t0)
        limit = float(limits.get(step.name, step.rehearse_s if rehearse else step.limit_s))
        if not step.timing and step.name != "tensorrt" and (only is None or "timings" in only):
            limit = min(limit, left - TIMINGS_RESERVE_S[rehearse])
        limit = min(limit, left)
        echo(f"\n#### step {step.name} (limit {max(limit, 0):.0f} s, {left:.0f} s of the budget left)", flush=True)
        entry = tensorrt_parent(rehearse) if step.name == "tensorrt" else None
        if entry is None and limit < min(MIN_STEP_S, float(limits.get(step.name, MIN_STEP_S))):
            reason = f"not started: {max(left, 0):.0f} s of the {budget:.0f} s budget left"
            entry = {"status": UNMEASURED, "limit_s": 0, "checks": [_rec(UNMEASURED, "step", reason)]}
        elif entry is None:
            entry = run_step(step, limit, rehearse, work, report, echo, spawn)
        entry["key_numbers"] = key_numbers(step.name, entry)
        report.doc["steps"][step.name] = entry
        if step.name == "preflight":
            report.doc["machine"] = entry.get("info", {})
        report.doc["goals"] = goals(report, rehearse)
        _finish(report)
        report.write()
    report.doc["wall_s"] = round(time.monotonic() - t0, 1)
    _finish(report)
    report.write()
    print_table(report, echo)
    return 1 if report.doc["summary"]["status"] == FAIL else 0


def _finish(report: Report) -> None:
    statuses = [e["status"] for e in report.doc["steps"].values()] + [g["status"] for g in report.doc["goals"]]
    counts = {s: statuses.count(s) for s in (PASS, FAIL, UNMEASURED, NEEDS_GPU) if statuses.count(s)}
    overall = FAIL if FAIL in counts else (UNMEASURED if UNMEASURED in counts else PASS)
    report.doc["summary"] = {"status": overall, "counts": counts}


# ============================================================================================ the step side


class CheckFailed(Exception):
    def __init__(self, detail: str, numbers: dict | None = None):
        super().__init__(detail)
        self.detail, self.numbers = detail, numbers or {}


@dataclass
class Outcome:
    """What a check returns when PASS with a plain detail string will not do."""

    detail: str = ""
    numbers: dict | None = None
    status: str = PASS


class Ctx:
    """What a step function gets: the device, the mode, and `check` to run and record one named check."""

    def __init__(self, step: str, rehearse: bool, work: Path):
        import torch

        self.step, self.rehearse, self.work = step, rehearse, work
        self.records = work / f"{step}.jsonl"
        self.device = torch.device("cpu" if rehearse else "cuda")
        self.cuda = self.device.type == "cuda"
        self.preset = "lia-32-tiny" if rehearse else "lia-256"
        self.tiny = "lia-32-tiny" if rehearse else "lia-256-tiny"
        self.lmdm_preset = "lmdm-tiny" if rehearse else "lmdm-default"
        self.numbers: dict = {}
        QUICK["on"] = rehearse
        if rehearse:  # one thread: on a shared, busy CPU, OpenMP's spinning threads slow small models 100-fold
            torch.set_num_threads(1)

    def _emit(self, rec: dict) -> None:
        with open(self.records, "a") as f:
            f.write(json.dumps(rec, default=_jsonable) + "\n")

    def plan(self, *names: str) -> None:
        self._emit({"kind": "plan", "names": list(names)})

    def info(self, **info) -> None:
        self._emit({"kind": "info", "info": info})

    def needs_gpu(self, name: str, why: str) -> None:
        self._record(_rec(NEEDS_GPU, name, why))

    def _record(self, rec: dict) -> None:
        self._emit(rec)
        nums = " ".join(f"{k}={_fmt(v)}" for k, v in rec["numbers"].items())
        print(f"[{self.step}] {rec['status']:<10} {rec['name']}: {rec['detail'][:300]} {nums}", flush=True)

    def check(self, name: str, fn, *, gpu_only: str | None = None):
        """Run fn() as the check `name`: PASS with its detail (a str, an Outcome, or None), FAIL on CheckFailed or
        any exception. gpu_only: the reason, when the rehearsal cannot run it (recorded NEEDS-GPU)."""
        if gpu_only is not None and self.rehearse:
            self.needs_gpu(name, gpu_only)
            return None
        t0 = time.perf_counter()
        try:
            res = fn()
        except CheckFailed as e:
            self.numbers.update(e.numbers)
            self._record(_rec(FAIL, name, e.detail, e.numbers, time.perf_counter() - t0))
            return None
        except Exception as e:  # noqa: BLE001 - every error is a result here
            trace = traceback.format_exc(limit=-6)
            rec = _rec(FAIL, name, f"{type(e).__name__}: {e}"[:2000], {}, time.perf_counter() - t0)
            rec["trace"] = trace[-4000:]
            self._record(rec)
            return None
        out = res if isinstance(res, Outcome) else Outcome(res or "")
        self.numbers.update(out.numbers or {})
        self._record(_rec(out.status, name, out.detail, out.numbers, time.perf_counter() - t0))
        return out


def _jsonable(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


# ----------------------------------------------------------------------------------------------- helpers


def rel_err(a, b) -> float:
    """Relative L2 error of a against b, in float64."""
    import torch

    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


QUICK = {"on": False}  # the rehearsal times each call a few times only: its numbers mean nothing


def device_s(fn, device, min_time: float) -> float:
    """Device time of one call: triton.testing.do_bench on a GPU (CUDA events, the L2 cache flushed between
    calls, so launch overhead is not counted), else the wall time."""
    import torch

    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(25, int(1e3 * min_time)), return_mode="median") / 1e3
    return per_call_s(fn, device, min_time=min_time)


def per_call_s(fn, device, *, min_time: float = 0.25, rounds: int = 5, warmup: int = 2) -> float:
    """Median wall time of one call of fn (host sync around each round of calls)."""
    if QUICK["on"]:
        rounds, warmup, min_time = 1, 1, 0.0
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t, 1e-6)
    n = max(1, min(200, int(min_time / rounds / one)))
    times = []
    for _ in range(rounds):
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        times.append((time.perf_counter() - t) / n)
    times.sort()
    return times[len(times) // 2]


def compile_standin(backend: str = "aot_eager"):
    """The rehearsal's torch.compile: a debugging backend instead of Inductor: "aot_eager" (dynamo's capture, fake
    tensors and AOTAutograd run) or "eager" (dynamo's capture only, for whole models). Inductor's code generation
    is what the GPU run checks."""
    import torch

    real = torch.compile

    def compile_(model=None, **kw):
        if kw.get("backend", "inductor") == "inductor":
            kw.update(backend=backend, mode=None, options=None)
        return real(model, **kw) if model is not None else real(**kw)

    torch.compile = compile_
    return real


def random_animator(preset: str, device, dtype, seed: int = 0):
    """An animator whose every parameter is moved off its initial value (biases and modulation offsets too), so a
    comparison exercises every parameter; built on the CPU in fp32, then moved."""
    import torch

    from leo_rt import Animator

    lia = Animator.random(preset, seed=seed).reference
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in lia.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            if name.endswith("modulation.bias"):
                p.copy_(1.0 + noise)  # modulation offsets stay near their trained value of ~1
            elif name.endswith("bias") or name.endswith("noise.weight"):
                p.copy_(noise)
            else:  # weights: unit normal, as the published layers scale them at run time
                p.copy_(torch.randn(p.shape, generator=g))
    return Animator(lia.to(device=device, dtype=dtype))


def animator_like(anim, dtype):
    """The same weights in another dtype (a copy)."""
    import copy

    from leo_rt import Animator

    return Animator(copy.deepcopy(anim.reference).to(dtype=dtype))


def random_lmdm(preset: str, device):
    import torch

    from leo_rt.lmdm import LMDM, LMDMConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lmdm = LMDM(LMDMConfig.from_name(preset))
    with torch.no_grad():  # every weight off its init (the output conv starts at zero)
        g = torch.Generator().manual_seed(1)
        for p in lmdm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return lmdm.to(device).eval()


def images(n: int, size: int, device, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(device)


def codes(n: int, device, seed: int = 0, scale: float = 0.5):
    import torch

    return (torch.randn(n, 20, generator=torch.Generator().manual_seed(seed)) * scale).to(device)


# ---------------------------------------------------------------------------------------- 0 preflight


def _version(dist: str) -> str | None:
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(dist) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def step_preflight(ctx: Ctx) -> None:
    import importlib
    import platform

    import torch

    import leo_rt
    from leo_rt import prereqs
    from leo_rt.backends import backend_status, choose_backend
    from leo_rt.precision import Precision

    ctx.plan("import", "device", "prerequisites", "backends", "tf32", "kernels dispatch")
    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "numpy", "onnx", "onnxruntime", "onnxscript", "tensorrt", "av"):
        info[mod] = _version(mod)  # looked up, not imported: importing av here would hide a missing one
    info["leo_rt_file"] = leo_rt.__file__
    info["kernels_file"] = importlib.import_module("leo_rt.kernels").__file__
    info["env"] = {k: os.environ.get(k) for k in ("LEO_RT_AUTOTUNE", "LEO_RT_KERNELS", "TRITON_INTERPRET", "CUDA_HOME")}

    ctx.check("import", lambda: f"leo_rt from {Path(leo_rt.__file__).parent}, kernels from {info['kernels_file']}")

    def device():
        if not torch.cuda.is_available():
            raise CheckFailed("torch sees no CUDA device")
        p = torch.cuda.get_device_properties(0)
        info.update(
            device=torch.cuda.get_device_name(0),
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            q = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"]
            info["driver"] = subprocess.run(q, capture_output=True, text=True, timeout=20).stdout.strip()
        if p.major < 8:
            raise CheckFailed(f"{info['device']} has capability {p.major}.{p.minor}; the goals assume Hopper/Ampere")
        return f"{info['device']}, capability {info['capability']}, {p.multi_processor_count} SMs"

    if ctx.rehearse:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, rehearsal)"
    ctx.check("device", device, gpu_only="no CUDA device in the rehearsal")

    def prerequisites():
        found = prereqs.describe()
        info["prereqs"] = found
        missing = {f: prereqs.check(f, ctx.device) for f in ("torch", "triton", "compile", "aoti")}
        info["missing_prereqs"] = missing
        bad = {f: m for f, m in missing.items() if m}
        detail = (f"cc={found['c_compiler']}, c++={found['cxx_compiler']}, Python.h={found['python_h']}, "
                  f"CUDA_HOME={found['cuda_home']} (headers {found['cuda_home_headers']}), nvcc={found['nvcc']}, "
                  f"pip toolkits={found['pip_cuda_homes']}")  # fmt: skip
        if bad:
            raise CheckFailed(f"missing: {bad}; found: {detail}")
        return detail

    ctx.check("prerequisites", prerequisites)

    def backends():
        status = backend_status(ctx.device)
        info["backends"] = status
        auto = choose_backend("auto", ctx.device)
        info["auto_backend"] = auto
        return f"auto → {auto}; " + ", ".join(f"{b}: {'ok' if w is None else w}" for b, w in status.items())

    ctx.check("backends", backends)

    def tf32():
        defaults = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        with Precision.FP32.math():
            off = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        with Precision.TF32.math():
            on = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        info["tf32_defaults"] = {"matmul": defaults[0], "cudnn": defaults[1]}
        restored = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == defaults
        if off != (False, False) or on != (True, True) or not restored:
            raise CheckFailed(f"Precision.math(): fp32 gives {off}, tf32 gives {on}, restored {restored}")
        return f"defaults matmul/cudnn TF32 = {defaults}; fp32 turns both off, tf32 on, and restores"

    ctx.check("tf32", tf32)

    def dispatch():
        from leo_rt import kernels
        from leo_rt.kernels import warp_triton

        info["kernels"] = {"enabled": kernels.kernels_enabled(), "triton": kernels.triton_available(),
                           "autotune": warp_triton.AUTOTUNE, "interpreted": warp_triton.INTERPRETED}  # fmt: skip
        if not hasattr(torch.ops.leo_rt, "warp_blend"):
            raise CheckFailed("the leo_rt::warp_blend op is not registered")
        if ctx.cuda and not (kernels.kernels_enabled() and kernels.triton_available()):
            raise CheckFailed(f"on CUDA the fused kernel would not run: {info['kernels']}")
        if warp_triton.AUTOTUNE:
            raise CheckFailed("autotuning is on: the check runs without sweeps (LEO_RT_AUTOTUNE=0)")
        return str(info["kernels"])

    ctx.check("kernels dispatch", dispatch)
    ctx.info(**info)


# ------------------------------------------------------------------------------------------ 1 kernels


RES_256 = ((8, 512), (16, 512), (32, 512), (64, 256), (128, 128), (256, 64))  # decoder maps (size, channels)


def _warp_inputs(b, c, r, dtype, layout, source, device, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: 10⁸ values at 256², batch 32
    k = {"shared": 1, "per-frame": b, "indexed": 3}[source]
    feat = torch.randn(k, c, r, r, generator=g, device=device)
    logits = torch.randn(b, 3, r, r, generator=g, device=device) * 2.0  # |Δ| up to 1: many taps leave the map
    logits[:, :2, 0, :] = 12.0  # one row pushed far outside: zeros padding answers
    h = torch.randn(b, c, r, r, generator=g, device=device)

    def conv(t):
        return t.to(dtype=dtype).contiguous(memory_format=layout)

    idx = (torch.arange(b) % k).to(device) if source == "indexed" else None
    return conv(feat), conv(logits), conv(h), idx


def _excess(got, torch_same, ref, keep=None) -> tuple[float, float, float]:
    """(error, bound, PyTorch composition's error) of one output against its float64 reference: the bound is
    2× the composition's own error in the same dtype, at least 2 roundings of the output's dtype, and at least
    1e-5 relative to the largest value (CLARIFICATIONS §2)."""
    import torch

    eps = torch.finfo(got.dtype).eps
    g, t, w = got.double(), torch_same.double(), ref
    if keep is not None:
        g, t, w = g[keep], t[keep], w[keep]
    err = float((g - w).abs().max())
    torch_err = float((t - w).abs().max())
    scale = float(w.abs().max())
    return err, max(2 * torch_err, 2 * eps * scale, 1e-5 * scale), torch_err


def step_kernels(ctx: Ctx) -> None:
    import torch

    from leo_rt import kernels
    from leo_rt.kernels import warp_blend_reference
    from leo_rt.kernels.warp_triton import warp_blend_triton

    # the public entry on a GPU (the renderer's own call); in the interpreter the launcher itself, since the
    # public entry sends CPU tensors to the reference
    def fused(feat, logits, h, idx):
        if ctx.cuda:
            return kernels.warp_blend(feat, logits, h, src_index=idx)
        return warp_blend_triton(feat, logits, h, idx)

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    layouts = {"NCHW": torch.contiguous_format, "CL": torch.channels_last}
    sources = ("shared", "per-frame", "indexed")
    sizes = RES_256 if ctx.cuda else ((8, 16), (5, 3))
    batches = (1, 8, 32) if ctx.cuda else (1, 2)
    names = [f"warp {d} {lay} {s}" for d in dtypes for lay in layouts for s in sources]
    ctx.plan(*names, "nan and inf logits", "int32 guard", "batch beyond grid limits")
    worst_all = [0.0]

    def one(dname, lname, source):
        dtype, layout = dtypes[dname], layouts[lname]
        worst, cases = 0.0, 0
        for r, c in sizes:
            for b in batches:
                feat, logits, h, idx = _warp_inputs(b, c, r, dtype, layout, source, ctx.device, seed=r + b)
                got = fused(feat, logits, h, idx)
                torch_same = warp_blend_reference(feat, logits, h, None, idx)  # the composition, in this dtype
                ref = warp_blend_reference(feat.double(), logits.double(), h.double(), None, idx)
                for g_, t_, w_, what in zip(got, torch_same, ref, ("warped", "out"), strict=True):
                    if g_.shape != w_.shape or g_.dtype != dtype:
                        raise CheckFailed(f"{what} {tuple(g_.shape)} {g_.dtype}, want {tuple(w_.shape)} {dtype}")
                    if not g_.is_contiguous(memory_format=layout):
                        raise CheckFailed(f"{what} is not in the inputs' layout {lname} (B={b}, {r}×{r})")
                    err, bound, torch_err = _excess(g_, t_, w_)
                    worst = max(worst, err / bound if bound > 0 else (0.0 if err == 0 else float("inf")))
                    if not err <= bound:
                        raise CheckFailed(
                            f"{what} B={b} C={c} {r}×{r}: error {err:.3g} > bound {bound:.3g} (PyTorch composition "
                            f"{torch_err:.3g})",
                            {"worst_kernel_to_bound": err / bound},
                        )
                cases += 1
        worst_all[0] = max(worst_all[0], worst)
        return Outcome(f"{cases} cases, worst error {worst:.2f}× its bound",
                       {"worst_kernel_to_bound": worst_all[0]})  # fmt: skip

    for dname in dtypes:
        for lname in layouts:
            for source in sources:
                ctx.check(f"warp {dname} {lname} {source}", lambda d=dname, la=lname, s=source: one(d, la, s))

    def nonfinite():
        r, c, b = (16, 32, 4) if ctx.cuda else (8, 4, 2)
        feat, logits, h, _ = _warp_inputs(b, c, r, torch.float32, torch.contiguous_format, "shared", ctx.device)
        logits = logits.clone()
        logits[0, 0, 1, 1], logits[0, 1, 2, 2] = float("inf"), float("-inf")  # saturate: Δ = ±1, defined
        logits[1, 2, 3, 3], logits[1, 2, 4, 4] = float("inf"), float("-inf")  # mask 1 and 0
        logits[0, 2, 5, 5] = float("nan")  # NaN mask: NaN out at that pixel, nowhere else
        got = fused(feat, logits, h, None)
        same = warp_blend_reference(feat, logits, h)
        want = warp_blend_reference(feat.double(), logits.double(), h.double())
        for g_, t_, w_, what in zip(got, same, want, ("warped", "out"), strict=True):
            if not torch.equal(torch.isnan(g_), torch.isnan(w_)):
                raise CheckFailed(f"{what}: NaN at {int(torch.isnan(g_).sum())} values, reference at "
                                  f"{int(torch.isnan(w_).sum())}")  # fmt: skip
            err, bound, _ = _excess(g_, t_, w_, ~torch.isnan(w_))
            if not err <= bound:
                raise CheckFailed(f"{what}: error {err:.3g} > bound {bound:.3g} away from the NaN pixel")
        flow_nan = logits.clone()
        flow_nan[1, 0, 6, 6] = float("nan")  # a NaN flow: only that pixel may go wrong
        got = fused(feat, flow_nan, h, None)
        same = warp_blend_reference(feat, flow_nan, h)
        want = warp_blend_reference(feat.double(), flow_nan.double(), h.double())
        keep = torch.ones_like(got[1], dtype=torch.bool)
        keep[1, :, 6, 6] = False
        keep[0, :, 5, 5] = False
        err, bound, _ = _excess(got[1], same[1], want[1], keep)
        if not err <= bound:
            raise CheckFailed(f"a NaN flow logit disturbed other pixels (error {err:.3g} > bound {bound:.3g})")
        return "±inf logits saturate as the reference does; NaN stays at its own pixel"

    ctx.check("nan and inf logits", nonfinite)

    def int32_guard():
        from leo_rt.errors import InputError

        # meta tensors: the guard reads shapes and strides only, so a 4 GiB case costs nothing
        b, c, r = 65, 512, 256  # 65·512·256² > 2³¹ elements
        feat = torch.empty(1, c, r, r, device="meta", dtype=torch.float16)
        logits = torch.empty(b, 3, r, r, device="meta", dtype=torch.float16)
        h = torch.empty(b, c, r, r, device="meta", dtype=torch.float16)
        try:
            warp_blend_triton(feat, logits, h, None)
        except InputError as e:
            return f"refused: {e}"
        raise CheckFailed("a tensor beyond 32-bit indexing was launched without a word")

    ctx.check("int32 guard", int32_guard)

    def grid_limits():
        b = 70_000  # above the 65535 limit of grid axes 1 and 2
        feat, logits, h, _ = _warp_inputs(b, 2, 2, torch.float16, torch.contiguous_format, "shared", ctx.device)
        got = fused(feat, logits, h, None)
        same = warp_blend_reference(feat, logits, h)
        want = warp_blend_reference(feat.double(), logits.double(), h.double())
        for g_, t_, w_ in zip(got, same, want, strict=True):
            err, bound, _ = _excess(g_, t_, w_)
            if not err <= bound:
                raise CheckFailed(f"batch {b}: error {err:.3g} > bound {bound:.3g}")
        return f"batch {b} of 2×2 maps within bounds"

    ctx.check("batch beyond grid limits", grid_limits, gpu_only="70 000 interpreted programs would take minutes")


# ---------------------------------------------------------------------------------------- 2 custom op


def step_custom_op(ctx: Ctx) -> None:
    import torch

    from leo_rt import kernels

    ctx.plan("opcheck", "opcheck indexed", "compile fullgraph", "compile fullgraph cuda graphs",
             "replay outputs kept", "export keeps one node")  # fmt: skip
    if ctx.rehearse:
        compile_standin()
    op = torch.ops.leo_rt.warp_blend
    feat, logits, h, _ = _warp_inputs(4, 16, 16, torch.float32, torch.contiguous_format, "shared", ctx.device)
    featk, _, _, idx = _warp_inputs(4, 16, 16, torch.float32, torch.contiguous_format, "indexed", ctx.device)

    def opcheck(args):
        res = torch.library.opcheck(op.default, args)
        bad = {k: v for k, v in res.items() if v != "SUCCESS"}
        if bad:
            raise CheckFailed(f"opcheck: {bad}")
        return ", ".join(res)

    ctx.check("opcheck", lambda: opcheck((feat, logits, h, None)))
    ctx.check("opcheck indexed", lambda: opcheck((featk, logits, h, idx)))

    def f(feat, logits, h):
        return kernels.warp_blend(feat, logits, h)

    want = f(feat, logits, h)
    label = " (rehearsal: aot_eager stand-in)" if ctx.rehearse else ""

    def compiled(mode):
        torch._dynamo.reset()
        cf = torch.compile(f, fullgraph=True, mode=mode)
        got = cf(feat, logits, h)
        got = cf(feat, logits, h)  # a second call: CUDA-graph trees record on the first and replay after
        diff = max(float((g_ - w_).abs().max()) for g_, w_ in zip(got, want, strict=True))
        if diff != 0.0:  # the same kernel and configuration inside and outside the graph: identical results
            raise CheckFailed(f"compiled differs from eager by {diff:.3g} (same kernel: expected identical)")
        return f"identical to eager{label}"

    ctx.check("compile fullgraph", lambda: compiled(None))
    ctx.check("compile fullgraph cuda graphs", lambda: compiled("reduce-overhead"), gpu_only="CUDA graphs")

    def replay_kept():
        torch._dynamo.reset()
        cf = torch.compile(f, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):
            cf(feat, logits, h)
        first = cf(feat, logits, h)
        cf(feat, logits * 0.5, h)  # the next replay
        try:
            diff = max(float((g_ - w_).abs().max()) for g_, w_ in zip(first, want, strict=True))
        except RuntimeError as e:  # torch refuses to read overwritten outputs: callers must copy (leo_rt does)
            return f"torch refuses to read a replaced replay's outputs ({str(e)[:120]}…)"
        if diff != 0.0:
            raise CheckFailed(f"a replay silently overwrote the previous outputs (difference {diff:.3g})")
        return "the previous replay's outputs are intact"

    ctx.check("replay outputs kept", replay_kept, gpu_only="CUDA graphs")

    def export_node():
        class M(torch.nn.Module):
            def forward(self, feat, logits, h):
                if ctx.cuda:
                    return kernels.warp_blend(feat, logits, h)  # the dispatcher sends CUDA tensors to the op
                return op(feat, logits, h, None)  # on the CPU the dispatcher runs the reference, not the op

        ep = torch.export.export(M(), (feat, logits, h))
        nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "warp_blend" in str(n.target)]
        if len(nodes) != 1:
            raise CheckFailed(f"{len(nodes)} warp_blend nodes in the exported graph: {[str(n.target) for n in nodes]}")
        got = ep.module()(feat, logits, h)
        diff = max(float((g_ - w_).abs().max()) for g_, w_ in zip(got, want, strict=True))
        if diff != 0.0:
            raise CheckFailed(f"the exported program differs from eager by {diff:.3g}")
        return f"one {nodes[0].target} node; runs identical to eager"

    ctx.check("export keeps one node", export_node)


# ----------------------------------------------------------------------------------------- 3 renderer


def step_renderer(ctx: Ctx) -> None:
    import torch

    from leo_rt.kernels import set_kernels_enabled
    from leo_rt.precision import Precision

    precisions = ("fp32", "tf32", "fp16", "bf16")
    ctx.plan("float64 reference", *(f"fast vs published {p}" for p in precisions))
    n = 4
    anim32 = random_animator(ctx.preset, ctx.device, torch.float32)
    size = anim32.size
    src, alpha = images(1, size, ctx.device, seed=3), codes(n, ctx.device, seed=4)
    truth = {}

    def published(anim, prec):
        ref = anim.reference
        with torch.no_grad(), prec.math():
            w_a, feats = ref.encode_app(src.to(anim.dtype))
            return ref.decode(w_a.expand(n, -1), alpha.to(anim.dtype), [f.expand(n, -1, -1, -1) for f in feats])

    def fast(anim, prec, kernels_on: bool):
        set_kernels_enabled(kernels_on)
        try:
            with torch.no_grad(), prec.math():
                return anim.render(anim.encode_source(src), alpha)
        finally:
            set_kernels_enabled(True)

    def reference():
        anim64 = animator_like(anim32, torch.float64)
        truth["frames"] = published(anim64, Precision.FP32)
        fast64 = fast(anim64, Precision.FP32, True)
        e = rel_err(fast64, truth["frames"])
        if e > 1e-10:
            raise CheckFailed(f"the fast form in float64 is {e:.3g} from the published form: not the same network")
        return f"{ctx.preset}, {n} frames; fast vs published in float64: {e:.2g}"

    ctx.check("float64 reference", reference)
    if "frames" not in truth:
        return

    def compare(pname):
        prec = Precision.parse(pname)
        anim = anim32 if prec.dtype == torch.float32 else animator_like(anim32, prec.dtype)
        pub = rel_err(published(anim, prec), truth["frames"])
        on = rel_err(fast(anim, prec, True), truth["frames"])
        off = rel_err(fast(anim, prec, False), truth["frames"])
        bound = max(2 * pub, 1e-5)
        nums = {f"published_{pname}_err": pub, f"fast_{pname}_err": on, f"fast_{pname}_kernels_off_err": off}
        if not (on <= bound and off <= bound):
            raise CheckFailed(f"fast {on:.3g} (kernels off {off:.3g}) > bound {bound:.3g} (published {pub:.3g})", nums)
        if not on <= max(2 * off, 1e-5):
            raise CheckFailed(f"kernels on {on:.3g} worse than 2× kernels off {off:.3g}", nums)
        note = "" if ctx.cuda else " (CPU: both run the reference warp)"
        return Outcome(f"vs float64: published {pub:.2g}, fast {on:.2g}, kernels off {off:.2g}{note}", nums)

    for p in precisions:
        ctx.check(f"fast vs published {p}", lambda p=p: compare(p))


# ------------------------------------------------------------------------------------------- 4 stream


def step_stream(ctx: Ctx) -> None:
    import torch

    from leo_rt import FrameCore, Session
    from leo_rt.precision import Precision

    ctx.plan("compile warmup", "accuracy vs float64", "reenact pattern twice", "generate pattern twice",
             "bucket padding", "split above max batch", "replay outputs kept", "serve core two sources")  # fmt: skip
    label = " (rehearsal: dynamo with the eager backend, no CUDA graphs)" if ctx.rehearse else ""
    if ctx.rehearse:
        compile_standin("eager")
    prec = Precision.FP32 if ctx.rehearse else Precision.FP16
    anim32 = random_animator(ctx.preset, ctx.device, torch.float32)
    anim = anim32 if prec.dtype == torch.float32 else animator_like(anim32, prec.dtype)
    src = images(1, anim.size, ctx.device, seed=5)
    core = FrameCore.load(anim, backend="compile", device=ctx.device, precision=prec, max_batch=8)
    session = Session(core)
    try:

        def warmup():
            t0 = time.perf_counter()
            core.warmup((8,))
            return f"bucket 8 in {time.perf_counter() - t0:.1f} s{label}"

        if ctx.check("compile warmup", warmup) is not None:
            _stream_checks(ctx, session, anim32, anim, prec, src, label)
    finally:
        session.close()
        core.close()
    _serve_check(ctx, anim32, anim, prec, src)


def _stream_checks(ctx: Ctx, session, anim32, anim, prec, src, label: str) -> None:
    import torch

    from leo_rt.motion import MotionSampler
    from leo_rt.precision import Precision

    size = anim.size
    session.start(src)
    drive = codes(24, ctx.device, seed=6)

    def accuracy():
        got = session.render(drive[:8])
        anim64 = animator_like(anim32, torch.float64)
        with torch.no_grad():
            truth = anim64.render(anim64.encode_source(src), drive[:8])
            with prec.math():
                eager = anim.render(anim.encode_source(src), drive[:8])
        e_c, e_e = rel_err(got, truth), rel_err(eager, truth)
        nums = {"compiled_fp16_err" if prec is Precision.FP16 else "compiled_err": e_c, "eager_err": e_e}
        if not e_c <= max(2 * e_e, 1e-5):
            raise CheckFailed(f"compiled {e_c:.3g} > 2× eager {e_e:.3g} (vs float64)", nums)
        return Outcome(f"vs float64: compiled {e_c:.2g}, eager {e_e:.2g}{label}", nums)

    ctx.check("accuracy vs float64", accuracy)

    def reenact_twice():
        runs = [torch.cat(list(session.stream([drive[:16], drive[16:]], batch=8))) for _ in range(2)]
        direct = torch.cat([session.render(drive[i : i + 8]) for i in range(0, 24, 8)])
        if not torch.equal(runs[0], runs[1]):
            raise CheckFailed(f"two streams of the same codes differ by {rel_err(runs[1], runs[0]):.3g}")
        e = rel_err(runs[0], direct)  # batches of 8 both ways: the same graph on the same codes
        if e > 0:
            raise CheckFailed(f"streamed frames differ from direct renders by {e:.3g} (expected identical)")
        return f"24 frames twice, identical to direct renders{label}"

    ctx.check("reenact pattern twice", reenact_twice)

    def generate_twice():
        lmdm = random_lmdm(ctx.lmdm_preset, ctx.device)
        sampler = MotionSampler(lmdm, "ddim", 3 if ctx.rehearse else 5)
        runs = [torch.cat(list(session.stream(sampler, n_frames=16, batch=8, seed=0))) for _ in range(2)]
        if runs[0].shape != (16, 3, size, size):
            raise CheckFailed(f"got {tuple(runs[0].shape)} frames")
        if not torch.equal(runs[0], runs[1]):
            raise CheckFailed(f"two seeded streams differ by {rel_err(runs[1], runs[0]):.3g}")
        return f"16 sampled frames twice (seed 0), identical{label}"

    ctx.check("generate pattern twice", generate_twice)

    def padding():
        five, eight = session.render(drive[:5]), session.render(drive[:8])
        if not torch.equal(five, eight[:5]):
            raise CheckFailed(
                f"5 frames padded to bucket 8 differ from the first 5 of 8: {rel_err(five, eight[:5]):.3g}"
            )
        return "5 frames (padded to bucket 8) equal the first 5 of a batch of 8"

    ctx.check("bucket padding", padding)

    def split():
        sixteen = session.render(drive[:16])  # the core's max_batch is 8: two calls
        halves = torch.cat([session.render(drive[:8]), session.render(drive[8:16])])
        if not torch.equal(sixteen, halves):
            raise CheckFailed(f"16 frames split at max_batch 8 differ from two renders: {rel_err(sixteen, halves):.3g}")
        return "16 frames at max_batch 8 equal two renders of 8"

    ctx.check("split above max batch", split)

    def kept():
        first = session.render(drive[:8])
        copy = first.clone()
        session.render(drive[8:16])
        if not torch.equal(first, copy):
            raise CheckFailed("the next render overwrote the frames handed out by the previous one")
        if ctx.rehearse:  # ran, but without CUDA graphs nothing could have overwritten them
            return Outcome("ran; meaningful with CUDA graphs only", status=NEEDS_GPU)
        return "frames of a render survive the next (copied out of the graph's memory)"

    ctx.check("replay outputs kept", kept)


def _serve_check(ctx: Ctx, anim32, anim, prec, src) -> None:
    import torch

    from leo_rt import FrameCore

    size = anim.size

    def serve():
        # eager backend (multi-source batches would compile another graph); max_wait so the two coalesce
        src_a = images(1, size, ctx.device, seed=7)
        ca, cb = codes(4, ctx.device, seed=8), codes(4, ctx.device, seed=9)
        with FrameCore.load(anim, backend="torch", device=ctx.device, precision=prec, max_wait_ms=200) as c2:
            ha, hb = c2.add_source(src_a), c2.add_source(src)
            fa, fb = c2.render(ha, ca), c2.render(hb, cb)
            both = (fa.result(), fb.result())
            batched = 8 in c2.batch_sizes
            alone = (c2.render(ha, ca).result(), c2.render(hb, cb).result())
        anim64 = animator_like(anim32, torch.float64)
        with torch.no_grad():
            truth = [anim64.render(anim64.encode_source(s), a) for s, a in ((src_a, ca), (src, cb))]
        if not batched:
            raise CheckFailed(f"the two requests were not rendered in one batch (batch sizes {c2.batch_sizes})")
        errs = []
        for b_, a_, t_ in zip(both, alone, truth, strict=True):
            eb, ea = rel_err(b_, t_), rel_err(a_, t_)
            errs.append((eb, ea))
            if not eb <= max(2 * ea, 1e-5):
                raise CheckFailed(f"batched {eb:.3g} vs alone {ea:.3g} (against float64)")
        return f"one batch of 2 sources × 4 frames; errors vs float64 batched/alone {errs[0][0]:.2g}/{errs[0][1]:.2g}"

    ctx.check("serve core two sources", serve)


# --------------------------------------------------------------------------------------------- 5 aoti


def step_aoti(ctx: Ctx) -> None:
    import torch

    from leo_rt import prereqs
    from leo_rt.export import ExportedStage, animator_stages, export_stages, state_dict_hash

    ctx.plan("prerequisites", "export", "load and compare", "package timings")
    prec = "fp32" if ctx.rehearse else "fp16"
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[prec]
    anim = random_animator(ctx.tiny, ctx.device, dtype)
    module, spec = animator_stages(anim, 32)["renderer"]
    out = ctx.work / "aoti"
    applied = {}

    def prerequisites():
        missing = prereqs.check("aoti", ctx.device)
        homes = prereqs.pip_cuda_homes()
        if any("toolkit's headers" in m for m in missing) and homes:
            # the fix the message gives, applied here to see that it works; torch reads CUDA_HOME when
            # torch.utils.cpp_extension is first imported, which may have happened already
            os.environ["CUDA_HOME"] = str(homes[0])
            if "torch.utils.cpp_extension" in sys.modules:
                sys.modules["torch.utils.cpp_extension"].CUDA_HOME = str(homes[0])
            applied["CUDA_HOME"] = str(homes[0])
            missing = prereqs.check("aoti", ctx.device)
        if missing:
            raise CheckFailed(f"missing: {missing}")
        return f"nothing missing{'; applied ' + str(applied) if applied else ''}"

    ctx.check("prerequisites", prerequisites, gpu_only="CUDA AOTInductor")

    def export():
        t0 = time.perf_counter()
        if ctx.rehearse:  # the trace that precedes compilation (the compilation itself is the GPU's part)
            ep = torch.export.export(module, spec.sample(2), dynamic_shapes=spec.dynamic_shapes())
            inputs = spec.sample(3)
            with torch.no_grad():
                e = rel_err(ep.module()(*inputs), module(*inputs))
            if e > 1e-6:
                raise CheckFailed(f"the exported program at an unseen batch differs by {e:.3g}")
            return f"torch.export with a dynamic batch; batch 3 matches eager ({e:.2g}); packaging needs a GPU"
        export_stages({"renderer": (module, spec)}, out, formats=("aoti",), precision=prec,
                      checkpoint_sha256=state_dict_hash(anim.state_dict()),
                      extra={"size": anim.size, "warp": "triton-op"})  # fmt: skip
        return f"{ctx.tiny} renderer, batch 1…32, {prec}, in {time.perf_counter() - t0:.1f} s"

    ok = ctx.check("export", export)
    if ctx.rehearse:
        ctx.needs_gpu("load and compare", "a CUDA AOTInductor package")
        ctx.needs_gpu("package timings", "a CUDA AOTInductor package")
        return
    if ok is None:
        return

    def compare():
        stage = ExportedStage(out, "renderer", "aoti")
        anim64 = animator_like(anim, torch.float64)
        ref_module, _ = animator_stages(anim64, 32)["renderer"]
        worst = {}
        for b in (1, 5, 32):
            inputs = spec.sample(b)
            with torch.no_grad():
                truth = ref_module(*(t.double() for t in inputs))
                eager = module(*inputs)
            got = stage(*inputs)[0]
            e_a, e_e = rel_err(got, truth), rel_err(eager, truth)
            worst[b] = (e_a, e_e)
            if not e_a <= max(2 * e_e, 1e-5):
                raise CheckFailed(f"batch {b}: package {e_a:.3g} > 2× eager {e_e:.3g} (vs float64)")
        e1 = worst[1][0]
        return Outcome(f"batches 1, 5, 32 vs float64: package {e1:.2g}, eager {worst[1][1]:.2g} (batch 1)",
                       {"aoti_err": e1})  # fmt: skip

    ctx.check("load and compare", compare)

    def timings():
        stage = ExportedStage(out, "renderer", "aoti")
        nums = {}
        for b in (1, 8, 32):
            inputs = spec.sample(b)
            s = per_call_s(lambda inputs=inputs: stage(*inputs), ctx.device, min_time=0.2)
            nums[f"aoti_b{b}_ms"] = 1e3 * s / b
        return Outcome(f"{ctx.tiny} (tiny preset: not comparable with the 256 rows) ms/frame "
                       + ", ".join(f"{k}={v:.3g}" for k, v in nums.items()), nums)  # fmt: skip

    ctx.check("package timings", timings)


# ------------------------------------------------------------------------------------------ 6 timings


def _matmul_tflops(device, dtype, n: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = per_call_s(lambda: a @ b, device, min_time=0.3)
    return 2 * n**3 / s / 1e12


def _copy_gbs(device, nbytes: int) -> float:
    import torch

    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    s = per_call_s(lambda: y.copy_(x), device, min_time=0.2)
    return 2 * nbytes / s / 1e9


def step_timings(ctx: Ctx) -> None:
    import torch

    from leo_rt import FrameCore, Session
    from leo_rt.bench import render_flops
    from leo_rt.kernels import base_grid, warp_blend, warp_blend_reference
    from leo_rt.motion import MotionSampler
    from leo_rt.precision import Precision

    names = (
        "peaks",
        "warp vs composition",
        "published call",
        "eager fp16",
        "eager bf16",
        "compile fp16 b8",
        "lmdm chunk",
        "lmdm chunk cuda graph",
        "generate end to end",
        "compile fp16 b1",
        "compile fp16 b32",
    )
    ctx.plan(*names)
    if ctx.rehearse:
        compile_standin("eager")
    dev, n_min = ctx.device, (0.05 if ctx.rehearse else 0.3)
    batches = (1, 2) if ctx.rehearse else (1, 8, 32)
    peak = {}

    def peaks():
        peak["fp16_tflops"] = _matmul_tflops(dev, torch.float16 if ctx.cuda else torch.float32,
                                             8192 if ctx.cuda else 256)  # fmt: skip
        peak["copy_gbs"] = _copy_gbs(dev, (1 << 30) if ctx.cuda else (8 << 20))
        return Outcome(f"fp16 matmul {peak['fp16_tflops']:.1f} TFLOP/s (8192³), copy {peak['copy_gbs']:.0f} GB/s",
                       dict(peak))  # fmt: skip

    ctx.check("peaks", peaks)
    peak.setdefault("fp16_tflops", float("nan"))
    peak.setdefault("copy_gbs", float("nan"))

    def warp():
        dtype = torch.float16 if ctx.cuda else torch.float32
        b = 8 if ctx.cuda else 2
        sizes = RES_256 if ctx.cuda else ((8, 16),)
        fused_s = torch_s = nbytes = 0.0
        rows = {}
        for r, c in sizes:
            feat, logits, h, _ = _warp_inputs(b, c, r, dtype, torch.contiguous_format, "shared", dev)
            grid = base_grid(r, device=dev)
            f_s = device_s(lambda feat=feat, logits=logits, h=h: warp_blend(feat, logits, h), dev, n_min)

            def composition(feat=feat, logits=logits, h=h, grid=grid):
                return warp_blend_reference(feat, logits, h, grid)

            t_s = device_s(composition, dev, n_min)
            es = torch.finfo(dtype).bits // 8
            by = (c * r * r + b * 3 * r * r + 3 * b * c * r * r) * es  # read feat, logits, h; write f̃ and h'
            fused_s, torch_s, nbytes = fused_s + f_s, torch_s + t_s, nbytes + by
            rows[r] = (1e3 * f_s, 1e3 * t_s, by / f_s / 1e9)
        speedup, gbs = torch_s / fused_s, nbytes / fused_s / 1e9
        nums = {"warp_b8_fp16_speedup": speedup, "warp_b8_fp16_gbs": gbs,
                "warp_b8_fp16_fraction_of_copy": gbs / peak["copy_gbs"]}  # fmt: skip
        for r, (f_ms, t_ms, g) in rows.items():
            nums.update({f"warp_{r}_fused_ms": f_ms, f"warp_{r}_torch_ms": t_ms, f"warp_{r}_gbs": g})
        note = " (device time, do_bench)" if ctx.cuda else " (CPU: both are the PyTorch composition)"
        return Outcome(f"all {len(sizes)} maps at batch {b}: {speedup:.2f}× the composition, {gbs:.0f} GB/s "
                       f"({100 * gbs / peak['copy_gbs']:.0f}% of copy){note}", nums)  # fmt: skip

    ctx.check("warp vs composition", warp)

    anim32 = random_animator(ctx.preset, dev, torch.float32)
    size = anim32.size
    gflop = render_flops(anim32) / 1e9
    src = images(1, size, dev, seed=11)
    eager = {}

    def published():
        nums = {}
        for pname in ("fp32", "fp16") if ctx.cuda else ("fp32",):
            prec = Precision.parse(pname)
            anim = anim32 if pname == "fp32" else animator_like(anim32, prec.dtype)
            lia = anim.reference
            for b in (1, 8) if ctx.cuda else (1,):
                s_img, d_img = src.to(prec.dtype).expand(b, -1, -1, -1), images(b, size, dev, seed=12).to(prec.dtype)
                with torch.no_grad(), prec.math():
                    s = per_call_s(lambda lia=lia, s_img=s_img, d_img=d_img: lia(s_img, d_img), dev, min_time=n_min)
                nums[f"published_{pname}_b{b}_ms"] = 1e3 * s / b
        return Outcome("LIA.forward (both images encoded per call) ms/frame: "
                       + ", ".join(f"{k}={v:.3g}" for k, v in nums.items()), nums)  # fmt: skip

    ctx.check("published call", published)

    def eager_rows(pname):
        prec = Precision.parse(pname)
        anim = animator_like(anim32, prec.dtype)
        state = anim.encode_source(src)
        nums = {}
        for b in batches:
            a = codes(b, dev, seed=b)
            with torch.no_grad(), prec.math():
                s = per_call_s(lambda a=a: anim.render(state, a), dev, min_time=n_min)
            nums[f"eager_{pname}_b{b}_ms"] = 1e3 * s / b
            nums[f"eager_{pname}_b{b}_fps"] = b / s
            nums[f"eager_{pname}_b{b}_fraction_of_peak"] = b / s * gflop / (1e3 * peak["fp16_tflops"])
        eager.update(nums)
        return Outcome(", ".join(f"b{b} {nums[f'eager_{pname}_b{b}_ms']:.3g} ms" for b in batches)
                       + f" per frame ({gflop:.1f} GFLOP/frame)", nums)  # fmt: skip

    ctx.check("eager fp16", lambda: eager_rows("fp16"))
    ctx.check("eager bf16", lambda: eager_rows("bf16"))

    anim16 = animator_like(anim32, torch.float16 if ctx.cuda else torch.float32)
    prec16 = Precision.FP16 if ctx.cuda else Precision.FP32
    core = FrameCore.load(anim16, backend="compile", device=dev, precision=prec16)
    compiled = {}

    def compile_row(b):
        t0 = time.perf_counter()
        core.warmup((b,))
        warm = time.perf_counter() - t0
        handle = core.add_source(src)
        a = codes(b, dev, seed=b)

        def timed():  # on the device worker, where compiled and captured work must run
            with torch.no_grad(), prec16.math():
                return per_call_s(lambda: core.runner.render(handle.state, a), dev, min_time=n_min)

        s = core.worker.call(timed)
        via_core = per_call_s(lambda: core.render(handle, a).result(), dev, min_time=n_min)  # + the hand-over
        core.remove_source(handle)
        key = f"compile_{prec16.value}_b{b}"
        nums = {f"{key}_ms": 1e3 * s / b, f"{key}_fps": b / s, f"{key}_via_core_ms": 1e3 * via_core / b,
                f"{key}_warmup_s": warm}  # fmt: skip
        nums[f"{key}_fraction_of_peak"] = b / s * gflop / (1e3 * peak["fp16_tflops"])
        compiled[b] = b / s
        if b == 32:
            best = max(b / s, eager.get(f"eager_fp16_b{b}_fps", 0.0))
            nums["best_fp16_b32_fps"] = best
            nums["best_fp16_b32_fraction_of_peak"] = best * gflop * 1e9 / (peak["fp16_tflops"] * 1e12)
        label = " (rehearsal: dynamo, eager backend, no CUDA graphs)" if ctx.rehearse else " (CUDA graphs)"
        return Outcome(f"{1e3 * s / b:.3g} ms/frame on the worker, {1e3 * via_core / b:.3g} through the core; "
                       f"warm-up {warm:.1f} s{label}", nums)  # fmt: skip

    # the GPU's batches 8, 1, 32; the rehearsal's stand-ins 2 and 1 (and b32 needs the GPU)
    rows = {8: 2, 1: 1, 32: None} if ctx.rehearse else {8: 8, 1: 1, 32: 32}
    try:
        ctx.check("compile fp16 b8", lambda: compile_row(rows[8]))
        lmdm = random_lmdm(ctx.lmdm_preset, dev)
        steps = 3 if ctx.rehearse else 25
        sampler = MotionSampler(lmdm, "ddim", steps)
        known = codes(1, dev, seed=13)[:, None].to(lmdm.data_std)

        def lmdm_eager():
            s = per_call_s(lambda: sampler.sample_chunk(known), dev, min_time=n_min, rounds=3, warmup=1)
            return Outcome(f"{sampler.chunk} codes, {steps} DDIM steps: {1e3 * s:.3g} ms eager",
                           {"lmdm_chunk_eager_ms": 1e3 * s})  # fmt: skip

        ctx.check("lmdm chunk", lmdm_eager)

        def lmdm_graph():
            static = known.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    sampler.sample_chunk(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = sampler.sample_chunk(static)
            graph.replay()
            sync(dev)
            if not torch.isfinite(out).all() or not torch.equal(out[:, :1], static):
                raise CheckFailed("the captured chunk is not finite or does not start at its known code")
            s = per_call_s(graph.replay, dev, min_time=n_min)
            return Outcome(f"{sampler.chunk} codes, {steps} DDIM steps: {1e3 * s:.3g} ms replayed",
                           {"lmdm_chunk_graph_ms": 1e3 * s})  # fmt: skip

        ctx.check("lmdm chunk cuda graph", lmdm_graph, gpu_only="CUDA graphs")

        def generate():
            n_frames = 16 if ctx.rehearse else 127  # two chunks of the 64-code LMDM
            gen_core = core
            if rows[8] not in compiled:  # the compile backend failed above: an end-to-end number from eager
                gen_core = FrameCore.load(anim16, backend="torch", device=dev, precision=prec16)
            try:
                return _generate(gen_core, n_frames)
            finally:
                if gen_core is not core:
                    gen_core.close()

        def _generate(core, n_frames):
            with Session(core) as session:
                session.start(src)
                list(session.stream(sampler, n_frames=8, batch=8, seed=0, output="uint8"))  # warm: sampling too
                t0 = time.perf_counter()
                session.start(src)
                n = 0
                for frames in session.stream(sampler, n_frames=n_frames, batch=8, seed=1, output="uint8"):
                    n += len(frames)  # the null sink: host uint8 frames, as a writer would take them
                    if time.perf_counter() - t0 > 20:
                        break
                wall = time.perf_counter() - t0
            return Outcome(f"{n} frames in {wall:.2f} s = {n / wall:.1f} frames/s ({core.name}, {prec16.value}, "
                           f"batch 8, ddim {steps} steps, output uint8 to a null sink)",
                           {"generate_fps": n / wall, "generate_frames": n})  # fmt: skip

        ctx.check("generate end to end", generate)
        for b in (1, 32):
            if rows[b] is None:
                ctx.needs_gpu(f"compile fp16 b{b}", "fp16 CUDA graphs at batch 32")
            else:
                ctx.check(f"compile fp16 b{b}", lambda b=b: compile_row(rows[b]))
    finally:
        core.close()


# ----------------------------------------------------------------------------------------- 7 tensorrt


def step_tensorrt(ctx: Ctx) -> None:  # reached only where tensorrt imports (see tensorrt_parent)
    import torch

    from leo_rt.export import animator_stages, export_stages, state_dict_hash
    from leo_rt.export.tensorrt import Profile, TRTEngine, build_engine

    ctx.plan("tensorrt engine")

    def engine():
        anim = random_animator(ctx.tiny, ctx.device, torch.float32)
        module, spec = animator_stages(anim, 8)["renderer"]
        out = ctx.work / "trt"
        export_stages({"renderer": (module, spec)}, out, formats=("onnx",),
                      checkpoint_sha256=state_dict_hash(anim.state_dict()), extra={"size": anim.size})  # fmt: skip
        path = build_engine(out / "renderer.onnx", out, precision="fp16", profile=Profile(1, 4, 8),
                            batch_inputs=spec.batch_inputs)  # fmt: skip
        eng = TRTEngine(path, out / "renderer.onnx")
        inputs = spec.sample(11)  # above the profile maximum: split
        got = eng.infer(dict(zip(spec.input_names, inputs, strict=True)))["frames"]
        with torch.no_grad():
            want = module(*inputs)
        return Outcome(f"fp16 engine, batch 11 split at 8: {rel_err(got, want):.2g} from eager fp32",
                       {"tensorrt_err": rel_err(got, want)})  # fmt: skip

    ctx.check("tensorrt engine", engine, gpu_only="TensorRT needs a GPU")


ABSENT_ON_GPU_IMAGE = ("av", "fastapi", "uvicorn", "aiortc", "ray", "playwright")  # CLARIFICATIONS §3

STEP_FUNCS = {
    "preflight": step_preflight,
    "kernels": step_kernels,
    "custom_op": step_custom_op,
    "renderer": step_renderer,
    "stream": step_stream,
    "aoti": step_aoti,
    "timings": step_timings,
    "tensorrt": step_tensorrt,
}


def main_step(args) -> int:
    work = Path(args.work)
    ctx = None
    try:
        ctx = Ctx(args.step, args.rehearse, work)
        STEP_FUNCS[args.step](ctx)
        absent = [m for m in ABSENT_ON_GPU_IMAGE if m in sys.modules]
        if absent:  # it works here only because this machine has them
            ctx._record(_rec(FAIL, "imports", f"the step imported {absent}, which the GPU image does not have"))
    except BaseException as e:  # a crash outside any check (an import error, say): recorded, then the exit status
        rec = _rec(FAIL, "step", f"{type(e).__name__}: {e}"[:2000])
        rec["trace"] = traceback.format_exc()[-4000:]
        with open(work / f"{args.step}.jsonl", "a") as f:
            f.write(json.dumps(rec, default=_jsonable) + "\n")
        print(rec["trace"], flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rehearse", action="store_true", help="the CPU rehearsal: every step's code path, no GPU")
    ap.add_argument("--out", default=None, help="the JSON file (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole check (default 300; 480 rehearsed)"
    )
    ap.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    ap.add_argument("--limit", default=None, help="per-step limits, e.g. kernels=30,timings=200")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument(
        "--spawn",
        choices=("exec", "fork"),
        default=None,
        help="how steps start: a fresh Python (default on a GPU) or a fork of a process that has imported leo_rt "
        "(default in the rehearsal, which it saves the imports of every step)",
    )
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)  # the per-step process
    args = ap.parse_args(argv)
    if args.only and set(args.only.split(",")) - set(STEP_FUNCS):
        ap.error(f"unknown steps in --only; choose from {', '.join(STEP_FUNCS)}")
    if args.step is not None:
        return main_step(args)
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
