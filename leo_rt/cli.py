"""`leo-rt`: the command line. Parses arguments into calls of library functions; nothing else lives here.

Every job that makes frames (reenact, demo, generate, edit) is a code source fed to Session.stream, the one frame
loop, and written by one writer path (`_write_stream`). Errors: a leo_rt.errors.LeoError prints one line and exits 2,
Ctrl-C prints "interrupted" and exits 130 (outputs are written atomically, so nothing half-written is left); any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from .backends import BACKENDS
from .errors import InputError, exit_code
from .io import RESIZE_POLICY
from .precision import names as precision_names
from .schedulers import SAMPLERS

BACKEND_HELP = "; ".join(f"{name}: {spec.summary}" for name, spec in BACKENDS.items())


def _add_common(p: argparse.ArgumentParser, device: str = "cpu", dtype: bool = True, backend: bool = True) -> None:
    p.add_argument("--device", default=device, help=f"cpu, cuda, cuda:N or auto (default: {device})")
    if dtype:
        p.add_argument(
            "--precision",
            choices=precision_names(),
            default="fp32",
            help="fp32 (IEEE: TF32 off), tf32, fp16 or bf16 (default: fp32)",
        )
    if backend:
        p.add_argument(
            "--backend",
            choices=[*BACKENDS, "auto"],
            default="torch",
            help=f"{BACKEND_HELP}; auto: the preferred available one (default: torch)",
        )
        p.add_argument(
            "--engines", default=None, help="an exported engines folder to run with the checkpoint (checked against it)"
        )
        p.add_argument("--stats", action="store_true", help="print per-stage p50/p95 timings at the end")
    p.add_argument("--batch", type=int, default=8, help="frames rendered per call (default: 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leo-rt", description="leo_rt: fast runtime for the LEO / LIA image animator")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "reenact",
        help="animate a source image with the motion of a driving video",
        description=f"Animate a source image with a driving video. Inputs that are not S×S are {RESIZE_POLICY}.",
    )
    p.add_argument("--checkpoint", required=True, help="official LIA .pt, leo_rt checkpoint directory or state dict")
    p.add_argument("--source", required=True, help="source image (PNG/JPEG, any mode)")
    p.add_argument("--driving", required=True, help="driving video (mp4/mov/webm)")
    p.add_argument("--out", required=True, help="output .mp4 (H.264), written with the driving video's fps")
    p.add_argument("--size", type=int, default=None, help="animator size; inferred from the checkpoint by default")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many driving frames")
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail on a video that is corrupt part-way (default: keep the frames before the damage, and say so)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--relative",
        dest="relative",
        action="store_true",
        default=True,
        help="motion relative to the first driving frame, as the published demo (default)",
    )
    mode.add_argument("--absolute", dest="relative", action="store_false", help="use the driving codes as they are")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p)

    p = sub.add_parser(
        "demo",
        help="animate an image with random weights, no download needed",
        description=f"Builds an animator (random weights unless --checkpoint), animates the shared "
        f"test portrait (or a drawn one) with a short driving clip, writes an mp4 and "
        f"prints a latency table. Inputs that are not S×S are {RESIZE_POLICY}.",
    )
    p.add_argument("--checkpoint", default=None, help="use real weights instead of random ones")
    p.add_argument("--preset", default="lia-256", help="animator shape for random weights (default: lia-256)")
    p.add_argument("--frames", type=int, default=24, help="frames to render (default: 24)")
    p.add_argument("--out", default="demo.mp4", help="output .mp4 (default: demo.mp4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    _add_common(p)

    p = sub.add_parser("extract-motion", help="motion codes of every frame of some videos, for LMDM training")
    p.add_argument("--checkpoint", required=True, help="animator checkpoint whose motion encoder is used")
    p.add_argument("--videos", required=True, nargs="+", help="video files and/or directories (searched recursively)")
    p.add_argument("--out", required=True, help="output .npz (codes, per-video lengths, fps, names)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p, backend=False)

    p = sub.add_parser("train-lmdm", help="train a motion diffusion model on extracted codes")
    p.add_argument("--codes", required=True, help=".npz from `leo-rt extract-motion`")
    p.add_argument("--out", required=True, help="checkpoint directory (safetensors + config.json + train_state.pt)")
    p.add_argument("--preset", default="lmdm-small", help="lmdm-tiny, lmdm-small (default) or lmdm-default")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p, device="auto", dtype=False, backend=False)  # trains in fp32, on CUDA when there is one
    p.set_defaults(batch=32)

    for name, helptext in (
        ("generate", "animate a source image with motion sampled by an LMDM, without end"),
        ("edit", "content-preserving editing: a video's motion on an edited first frame"),
    ):
        p = sub.add_parser(name, help=helptext, description=f"{helptext}. Inputs that are not S×S are {RESIZE_POLICY}.")
        p.add_argument("--checkpoint", required=True, help="animator checkpoint")
        p.add_argument("--out", required=True, help="output .mp4")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        _add_common(p)
    gen = sub.choices["generate"]
    gen.add_argument("--lmdm", default=None, help="LMDM directory from train-lmdm (default: an untrained LMDM)")
    gen.add_argument("--source", required=True, help="source image")
    gen.add_argument("--frames", type=int, required=True, help="frames to generate")
    gen.add_argument("--fps", type=float, default=25.0, help="frame rate of the output (default: 25)")
    gen.add_argument("--steps", type=int, default=25, help="denoising steps per chunk (default: 25)")
    gen.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chunk", type=int, default=None, help="codes per chunk (default: the LMDM's trained length)")
    gen.add_argument("--overlap", type=int, default=0, help="codes shared by consecutive chunks beyond the first")
    ed = sub.choices["edit"]
    ed.add_argument("--video", required=True, help="the original video (motion comes from here)")
    ed.add_argument("--first-frame", required=True, help="the edited first frame (appearance comes from here)")
    ed.add_argument("--strict", action="store_true", help="fail on a video that is corrupt part-way")
    ed.add_argument(
        "--relative",
        action="store_true",
        help="move the edited frame by the motion since the first frame instead of using the codes as "
        "they are (absolute, default)",
    )

    p = sub.add_parser("export", help="export the stages to ONNX / AOTInductor / TensorRT, with a manifest")
    p.add_argument("--checkpoint", required=True, help="animator checkpoint")
    p.add_argument("--lmdm", default=None, help="also export this LMDM's denoiser")
    p.add_argument("--out", required=True, help="output directory (artifacts + manifest.json)")
    p.add_argument("--format", default="onnx", help="comma-separated: onnx, aoti, trt (default: onnx)")
    p.add_argument(
        "--precision",
        choices=[n for n in precision_names() if n != "tf32"],
        default="fp32",
        help="AOTInductor packages and TensorRT engines (ONNX files stay fp32)",
    )
    p.add_argument("--max-batch", type=int, default=32, help="largest batch the artifacts accept (default: 32)")
    p.add_argument("--device", default="cpu", help="device to export for (aoti: the package targets it)")
    p.add_argument(
        "--decomposed-warp",
        action="store_true",
        help="on CUDA, export the warp as standard ops instead of the fused Triton kernel (compiled into the package)",
    )
    p.add_argument(
        "--onnx-warp-node",
        action="store_true",
        help="write the warp as one leo_rt::WarpBlend node in the ONNX files (default: standard ops)",
    )
    p.add_argument("--force", action="store_true", help="rebuild artifacts that are up to date")

    sub.add_parser("doctor", help="device, versions, and which backends are available (and why not)")

    p = sub.add_parser("bench", help="per-stage latency of backends vs the published call pattern, in one run")
    p.add_argument("--backends", default="torch", help="comma-separated backends (default: torch)")
    p.add_argument("--sizes", default="128,256", help="comma-separated sizes (default: 128,256)")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default: 1,8,32)")
    p.add_argument("--precision", choices=precision_names(), default="fp32")
    p.add_argument("--frames", type=int, default=5, help="timed calls per case (default: 5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="reduced-width models (a smoke run, not a measurement)")
    p.add_argument("--json", default=None, help="write the result (with machine info) here")
    p.add_argument("--plot", default=None, help="write a PNG of latency and throughput vs batch here")

    from .serve.command import add_serve_arguments

    p = sub.add_parser("serve", help="live avatars over WebRTC and WebSocket, a page at / (--ray: on Ray Serve)")
    add_serve_arguments(p)
    from .serve.cluster import add_cluster_arguments

    add_cluster_arguments(p)

    p = sub.add_parser("info", help="describe a checkpoint: size, parameters, format, contents")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _progress(total: int | None, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", disable=disable, file=sys.stderr, dynamic_ncols=True)


def _session(args, source, size=None):
    """The Session behind a command, printing which backend `auto` chose."""
    from .session import Session

    session = Session(
        source,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        size=size,
        engines=getattr(args, "engines", None),
        log=print,
    )
    if session.backend_name.startswith("compile") and session.device.type == "cuda":
        t0 = time.perf_counter()
        session.core.warmup((args.batch,))  # compile and capture before the stream, not in the middle of it
        print(f"warm-up: compiled the buckets up to batch {args.batch} in {time.perf_counter() - t0:.1f} s")
    return session


def _write_stream(frames, out: str, fps: float, total: int | None, timer, quiet: bool) -> int:
    """The one writer path: batches of frames from Session.stream into an H.264 file, timed as "write"."""
    from .io import VideoWriter

    bar = _progress(total, quiet or not sys.stderr.isatty())
    with bar, VideoWriter(out, fps) as writer:
        for batch in frames:
            with timer.stage("write", len(batch), host=True):
                writer.write(batch)
            bar.update(len(batch))
    return writer.frames


def _reenact_into(session, source, driving, out: str, fps: float, *, relative: bool, batch: int, total, quiet) -> int:
    """Reenactment as a code source: driving frames → motion codes (relative by default) → Session.stream."""
    from .pipelines import driving_codes

    state = session.start(source)
    codes = driving_codes(session, state, driving, relative=relative, batch=batch)
    return _write_stream(session.stream(codes, batch=batch), out, fps, total, session.timer, quiet)


def _report(what: str, n: int, seconds: float, session, extra: str = "") -> None:
    per = f"{n / seconds:.2f} frames/s, {1e3 * seconds / max(n, 1):.0f} ms per frame" if n else "no frames"
    print(f"wrote {what}: {n} frames in {seconds:.1f} s — {per} ({session.backend_name} backend{extra})")


def cmd_reenact(args) -> int:
    from .io import iter_video, load_image, video_info
    from .timing import keep_heap_memory

    keep_heap_memory()
    with _session(args, args.checkpoint, size=args.size) as session:
        s = session.size
        source = load_image(args.source, s)
        info = video_info(args.driving)
        total = min(x for x in (info.frames, args.max_frames) if x) if (info.frames or args.max_frames) else None
        t0 = time.perf_counter()
        driving = iter_video(args.driving, s, args.max_frames, strict=args.strict)
        n = _reenact_into(
            session, source, driving, args.out, info.fps, relative=args.relative, batch=args.batch, total=total,
            quiet=args.no_progress,
        )  # fmt: skip
        _report(f"{args.out} at {info.fps:g} fps ({s}×{s})", n, time.perf_counter() - t0, session)
        if args.stats:
            print(session.timer.table())
    return 0


def cmd_demo(args) -> int:
    from .animator import Animator, load_animator
    from .backends import resolve_device
    from .io import iter_video, read_image, square_resize, to_model
    from .pipelines import find_shared_data, synthetic_driving, synthetic_portrait
    from .precision import Precision
    from .timing import keep_heap_memory

    keep_heap_memory()
    device, dtype = resolve_device(args.device), Precision.parse(args.precision).dtype
    t0 = time.perf_counter()
    if args.checkpoint:
        animator = load_animator(args.checkpoint, device=device, dtype=dtype)
        print(f"weights: {args.checkpoint}")
    else:
        animator = Animator.random(args.preset, seed=args.seed, device=device, dtype=dtype)
        print(f"weights: random weights — pass --checkpoint for real output ({args.preset}, seed {args.seed})")
    with _session(args, animator) as session:
        load_s = time.perf_counter() - t0
        s = animator.size
        data = find_shared_data()
        fps = 10.0
        if data is not None:
            portrait = square_resize(read_image(data / "vox/mona_lisa.png"), s)
            driving = iter_video(data / "vox/driving1.mp4", s, args.frames)
            print(f"source: {data / 'vox/mona_lisa.png'}; driving: first {args.frames} frames of "
                  f"{data / 'vox/driving1.mp4'}")  # fmt: skip
        else:
            portrait = synthetic_portrait(s)
            driving = synthetic_driving(portrait, args.frames)
            print(f"source: a drawn portrait; driving: a synthetic {args.frames}-frame sway (shared data not found)")
        t1 = time.perf_counter()
        n = _reenact_into(
            session, to_model(portrait), driving, args.out, fps, relative=True, batch=args.batch, total=args.frames,
            quiet=True,
        )  # fmt: skip
        dt = time.perf_counter() - t1
        print(f"wrote {args.out}: {n} frames, {s}×{s}, {args.precision} on {device}; model built in {load_s:.1f} s")
        print(session.timer.table())
        print(f"end to end: {n / dt:.2f} frames/s, {1e3 * dt / n:.0f} ms per frame (batch {args.batch})")
    return 0


def cmd_info(args) -> int:
    from .checkpoint import describe_checkpoint

    d = describe_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    p = d["parameters"]
    print(f"{d['path']}")
    print(f"  format      {d['format']}")
    print(
        f"  size        {d['size']}×{d['size']}  (style dim {d['config']['style_dim']}, motion dim "
        f"{d['config']['motion_dim']}, channel multiplier {d['config']['channel_multiplier']})"
    )
    print(f"  parameters  {p['total']:,} (encoder {p['encoder']:,}, decoder {p['decoder']:,})")
    print(f"  tensors     {d['tensors']} ({', '.join(d['dtypes'])})")
    if d["extras"]:
        print(f"  also holds  {', '.join(d['extras'])}")
    if d["args"]:
        print("  args        " + ", ".join(f"{k}={v}" for k, v in sorted(d["args"].items())))
    return 0


def cmd_extract_motion(args) -> int:
    from .animator import load_animator
    from .backends import resolve_device
    from .precision import Precision
    from .train import extract_motion, find_videos

    device = resolve_device(args.device)
    animator = load_animator(args.checkpoint, device=device, dtype=Precision.parse(args.precision).dtype)
    videos = find_videos(args.videos)
    bar = _progress(len(videos), args.no_progress or not sys.stderr.isatty())
    with bar:
        data = extract_motion(animator, videos, batch=args.batch, on_video=lambda v, n: bar.update(1))
    data.save(args.out)
    print(f"wrote {args.out}: {len(data.codes)} codes from {len(videos)} videos (lengths {data.lengths.tolist()})")
    return 0


def cmd_train_lmdm(args) -> int:
    from .backends import resolve_device
    from .lmdm import LMDMConfig
    from .train import MotionCodes, TrainConfig, train_lmdm

    device = resolve_device(args.device)
    preset = LMDMConfig.from_name(args.preset)
    data = MotionCodes.load(args.codes, motion_dim=preset.motion_dim)
    cfg = TrainConfig(
        steps=args.steps, batch=args.batch, lr=args.lr, ema_decay=args.ema, save_every=args.save_every, seed=args.seed
    )
    bar = _progress(args.steps, args.no_progress or not sys.stderr.isatty())
    last = {}

    def on_step(step, loss):
        last["loss"] = loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    with bar:
        train_lmdm(data, args.out, preset=preset, cfg=cfg, device=device, resume=args.resume, on_step=on_step)
    print(f"wrote {args.out}: {args.preset}, {args.steps} steps, last loss {last.get('loss', float('nan')):.4f}")
    return 0


def cmd_generate(args) -> int:
    from .io import load_image
    from .lmdm import LMDM, LMDMConfig, load_lmdm
    from .motion import MotionSampler
    from .timing import keep_heap_memory

    keep_heap_memory()
    with _session(args, args.checkpoint) as session:
        if args.lmdm:
            lmdm = load_lmdm(args.lmdm, device=session.device)
        else:
            lmdm = LMDM(LMDMConfig.from_name("lmdm-small")).to(session.device)
            print(
                "lmdm: none given — using an UNTRAINED LMDM (lmdm-small, random weights); the motion is noise. "
                "Train one with `leo-rt train-lmdm` and pass --lmdm"
            )
        sampler = MotionSampler(lmdm, args.sampler, args.steps, chunk=args.chunk)
        t0 = time.perf_counter()
        session.start(load_image(args.source, session.size))
        # sampling of chunk k+1 overlaps rendering of chunk k; frames are written here
        frames = session.stream(sampler, n_frames=args.frames, batch=args.batch, seed=args.seed, overlap=args.overlap)
        n = _write_stream(frames, args.out, args.fps, args.frames, session.timer, args.no_progress)
        extra = f"; {args.sampler}, {args.steps} steps, chunk {sampler.chunk}, overlap {args.overlap}"
        _report(f"{args.out} at {args.fps:g} fps", n, time.perf_counter() - t0, session, extra)
        print(session.timer.table())
    return 0


def cmd_edit(args) -> int:
    from .io import iter_video, load_image, video_info
    from .pipelines import video_codes
    from .timing import keep_heap_memory

    keep_heap_memory()
    with _session(args, args.checkpoint) as session:
        info = video_info(args.video)
        t0 = time.perf_counter()
        codes = video_codes(session, iter_video(args.video, session.size, strict=args.strict), args.batch)
        state = session.start(load_image(args.first_frame, session.size))
        if args.relative:
            codes = session.relative_alpha(state, codes, codes[:1])
        frames = session.stream([codes], batch=args.batch)
        n = _write_stream(frames, args.out, info.fps, len(codes), session.timer, args.no_progress)
        mode = "relative" if args.relative else "absolute"
        _report(f"{args.out} at {info.fps:g} fps, motion of {args.video}, appearance of {args.first_frame} ({mode})",
                n, time.perf_counter() - t0, session)  # fmt: skip
        if args.stats:
            print(session.timer.table())
    return 0


def cmd_export(args) -> int:
    from .backends import resolve_device
    from .export import export_checkpoint

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    t0 = time.perf_counter()
    manifest = export_checkpoint(
        args.checkpoint,
        args.out,
        lmdm_dir=args.lmdm,
        formats=formats,
        precision=args.precision,
        max_batch=args.max_batch,
        device=str(resolve_device(args.device)),
        decomposed_warp=args.decomposed_warp,
        onnx_warp_node=args.onnx_warp_node,
        force=args.force,
        log=print,
    )
    print(f"{args.out}: {len(manifest['artifacts'])} artifacts in manifest.json ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_bench(args) -> int:

    from .bench import plot, print_table, run_bench
    from .files import write_json
    from .timing import keep_heap_memory

    keep_heap_memory()
    result = run_bench(
        [b for b in args.backends.split(",") if b],
        [int(s) for s in args.sizes.split(",")],
        [int(b) for b in args.batches.split(",")],
        precision=args.precision,
        frames=args.frames,
        device=args.device,
        tiny=args.tiny,
        log=print,
    )
    print_table(result)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")
    return 0


def _found(tool: str | None, runs: bool) -> str:
    if tool is None:
        return "not found"
    return tool if runs else f"{tool} (does not run)"


def cmd_doctor(args) -> int:
    import importlib
    import platform
    import shutil
    import subprocess

    from . import prereqs
    from .backends import backend_status

    print(f"python      {platform.python_version()} on {platform.machine()}, {torch.get_num_threads()} torch threads")
    print(f"torch       {torch.__version__} (CUDA build {torch.version.cuda or 'none'})")
    for mod in ("triton", "onnx", "onnxruntime", "onnxscript", "tensorrt", "av"):
        try:
            print(f"{mod:<11} {importlib.import_module(mod).__version__}")
        except ImportError:
            print(f"{mod:<11} not installed")
    devices = ["cpu"]
    if torch.cuda.is_available():
        driver = "unknown"
        if shutil.which("nvidia-smi"):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            driver = out.stdout.strip() or driver
        print(
            f"cuda        {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}, "
            f"driver {driver})"
        )
        devices.append("cuda")
    else:
        print("cuda        no CUDA device visible")
    found = prereqs.describe()
    print(f"c compiler  {_found(found['c_compiler'], found['c_compiler_runs'])} (Triton's launcher on CUDA)")
    cxx = _found(found["cxx_compiler"], found["cxx_compiler_runs"])
    print(f"c++         {cxx} (torch.compile on CPU, AOTInductor)")
    print(f"Python.h    {'found' if found['python_h'] else 'missing'} in {found['python_include']}")
    toolkit = "none found" if not found["cuda_home"] else found["cuda_home"]
    if found["cuda_home"] and not found["cuda_home_headers"]:
        toolkit += " (without cuda.h / cuda_runtime_api.h)"
    if not found["cuda_home_headers"] and found["pip_cuda_homes"]:
        toolkit += f"; pip's toolkit: export CUDA_HOME={found['pip_cuda_homes'][0]}"
    print(f"CUDA_HOME   {toolkit} (CUDA AOTInductor)")
    print(f"nvcc        {found['nvcc'] or 'not found (not needed)'}")
    print(f"libcuda     so.1 in {', '.join(found['libcuda_so_1_dirs']) or 'no folder found'}; "
          f"link name libcuda.so in {', '.join(found['libcuda_so_link_dirs']) or 'no folder found'}")  # fmt: skip
    if torch.cuda.is_available():
        print(f"TF32        cuDNN {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32} "
              "(leo_rt turns it off for fp32 calls; --precision tf32 turns it on)")  # fmt: skip
    for dev in devices:
        for name, why in backend_status(dev).items():
            print(f"backend     {name:<17} {dev:<5} {'available' if why is None else 'unavailable: ' + why}")
    return 0


def cmd_serve(args) -> int:
    if getattr(args, "ray", None) is not None and args.ray is not False:
        from .serve.cluster import run_cluster_from_args

        return run_cluster_from_args(args) or 0
    from .serve.command import run_server

    return run_server(args) or 0


COMMANDS = {
    "serve": cmd_serve,
    "reenact": cmd_reenact,
    "demo": cmd_demo,
    "info": cmd_info,
    "extract-motion": cmd_extract_motion,
    "train-lmdm": cmd_train_lmdm,
    "generate": cmd_generate,
    "edit": cmd_edit,
    "export": cmd_export,
    "doctor": cmd_doctor,
    "bench": cmd_bench,
}


def _check_args(args) -> None:
    """Argument values argparse cannot check: counts ≥ 1, finite positive rates."""
    for name in ("batch", "max_frames", "frames", "steps", "save_every", "max_batch", "chunk", "max_sessions"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if getattr(args, "overlap", None) is not None and args.overlap < 0:
        raise InputError(f"--overlap must be 0 or more, got {args.overlap}")
    fps = getattr(args, "fps", None)
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise InputError(f"--fps must be a finite number above 0, got {fps}")


def main(argv: list[str] | None = None) -> int:
    from .errors import describe

    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        return COMMANDS[args.command](args)
    except BaseException as e:
        code = exit_code(e)
        if code is None:
            raise  # a bug: keep the traceback
        print(f"leo-rt {args.command}: {describe(e)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
