"""The frame core: one long-lived device worker per process and device, and the batched multi-source render step.

Every device call of leo_rt — encoding, rendering, LMDM sampling, compiled graphs, CUDA-graph capture and replay —
runs on the `DeviceWorker` of its device, one thread per process and device. Why one: on torch 2.11 the CUDA-graph
trees of torch.compile keep their state in a thread-local filled only on the importing thread (a second thread
asserts), and graph capture is not serialised across threads; one thread makes both questions moot, and it is
where a GPU wants its work issued from anyway (asynchronously, in order).

A `FrameCore` puts one runner (the animator or a backend) behind that worker and holds many sources. Render
requests of different sources queued at the same time are coalesced into one batched call: frames of several
sources in one batch, each frame with its source index into a stack of source states (`SourceBank`), so many
sessions share one device the way an LLM server batches conversations. Each batch takes at most one request per
source, oldest first, so no source starves another and a source's frames keep their order.

    core = FrameCore.load("vox.pt", backend="auto", device="cuda", precision="fp16")
    a, b = core.add_source(image_a), core.add_source(image_b)
    fa, fb = core.render(a, codes_a), core.render(b, codes_b)   # futures; one batched render for both
    frames_a = fa.result()

Sessions (`leo_rt.session.Session`) are the streaming front of a core; see docs/ARCHITECTURE.md §5.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError, LeoError
from .fast import SourceState
from .precision import Precision
from .runner import Runner
from .timing import StageTimer

# ------------------------------------------------------------------------------------------------ device worker


@dataclass
class _Job:
    future: Future
    fn: Callable | None = None  # a plain call: fn(*args, **kwargs)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    key: Hashable | None = None  # a batchable call: batch_fn([item, ...]) -> [result, ...]
    batch_fn: Callable | None = None
    item: object = None
    group: Hashable | None = None  # at most one job per group in a batch (one request per source)
    max_batch: int = 1
    weight: int = 1  # how much of max_batch this job uses (frames)
    max_wait_s: float = 0.0


class DeviceWorker:
    """One thread that runs every device call for one device, in submission order (batchable calls coalesced).

    Shared process-wide: `DeviceWorker.acquire(device)` returns the running worker of that device (starting it)
    and counts a reference; `release()` drops it, and the thread ends with the last reference."""

    _registry: dict[str, DeviceWorker] = {}
    _registry_lock = threading.Lock()

    def __init__(self, device: torch.device):
        self.device = device
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._refs = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"leo_rt-device-{device}", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, device: torch.device | str) -> DeviceWorker:
        device = _canonical(device)
        with cls._registry_lock:
            worker = cls._registry.get(str(device))
            if worker is None:
                worker = cls._registry[str(device)] = cls(device)
            worker._refs += 1
            return worker

    def release(self) -> None:
        """Drop one reference; the last one stops the thread after the jobs already queued (and joins it)."""
        with DeviceWorker._registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            DeviceWorker._registry.pop(str(self.device), None)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        return self._put(_Job(Future(), fn, args, kwargs))

    def submit_batched(
        self,
        key: Hashable,
        batch_fn: Callable[[list], list],
        item,
        *,
        group: Hashable | None = None,
        max_batch: int = 1,
        weight: int = 1,
        max_wait_s: float = 0.0,
    ) -> Future:
        """Queue `item` for `batch_fn`: jobs with the same key waiting together run as one batch_fn(items) call
        (at most one per `group`, total weight ≤ max_batch; the first waits up to max_wait_s for company)."""
        return self._put(_Job(Future(), key=key, batch_fn=batch_fn, item=item, group=group, max_batch=max_batch,
                              weight=weight, max_wait_s=max_wait_s))  # fmt: skip

    def call(self, fn: Callable, *args, **kwargs):
        """Run fn on the worker and return its result (inline when already on the worker)."""
        if self.on_worker:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def _put(self, job: _Job) -> Future:
        with self._cv:
            if self._closing:
                raise RuntimeError(f"the device worker of {self.device} has been released")
            self._jobs.append(job)
            self._cv.notify_all()
        return job.future

    def _next_batch(self) -> list[_Job] | None:
        with self._cv:
            while not self._jobs:
                if self._closing:
                    return None
                self._cv.wait()
            first = self._jobs.popleft()
            if first.key is None:
                return [first]
            batch, deadline = [first], time.monotonic() + first.max_wait_s
            while True:
                self._take_company(batch)
                left = deadline - time.monotonic()
                if sum(j.weight for j in batch) >= first.max_batch or left <= 0 or self._closing:
                    return batch
                self._cv.wait(left)

    def _take_company(self, batch: list[_Job]) -> None:
        first = batch[0]
        groups = {j.group for j in batch if j.group is not None}
        used = sum(j.weight for j in batch)
        keep: deque[_Job] = deque()
        while self._jobs:
            job = self._jobs.popleft()
            fits = job.key == first.key and used + job.weight <= first.max_batch
            if fits and (job.group is None or job.group not in groups):
                batch.append(job)
                used += job.weight
                if job.group is not None:
                    groups.add(job.group)
            else:
                keep.append(job)
        self._jobs = keep

    def _run(self) -> None:
        _prepare_device_thread(self.device)
        while (batch := self._next_batch()) is not None:
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                if batch[0].key is None:
                    job = batch[0]
                    results = [job.fn(*job.args, **job.kwargs)]
                else:
                    results = batch[0].batch_fn([j.item for j in batch])
            except BaseException as e:  # handed to every caller of the batch
                for j in batch:
                    j.future.set_exception(e)
                continue
            for j, r in zip(batch, results, strict=True):
                j.future.set_result(r)


def _canonical(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _prepare_device_thread(device: torch.device) -> None:
    """Make this thread fit to run compiled and captured CUDA work: the device is current, and torch.compile's
    CUDA-graph trees find their thread-local state (torch ≤ 2.11 fills it only on the thread that imported the
    module, and asserts on any other; later versions create it on demand)."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    try:
        from torch._inductor import cudagraph_trees
    except ImportError:  # pragma: no cover - torch built without inductor
        return
    local = cudagraph_trees.local
    if not hasattr(local, "tree_manager_containers"):
        init = getattr(cudagraph_trees, "_initialize_tls", None)
        if init is not None:
            init(local)
        else:  # torch 2.11: the same two attributes its module-level set-up creates
            from collections import defaultdict

            local.tree_manager_containers = {}
            local.tree_manager_locks = defaultdict(threading.Lock)


# -------------------------------------------------------------------------------------------------- sources


@dataclass(eq=False)
class SourceHandle:
    """A source held by a FrameCore: its encoded state and its slot in the core's SourceBank (when stacked)."""

    id: int
    state: SourceState

    def __hash__(self) -> int:
        return self.id


class SourceBank:
    """The sources of a core stacked along the batch axis, so one render call can take frames of several sources
    by index (the warp reads feat[src_index[n]]; nothing is copied per frame). Slots are reused; the stack grows
    by doubling. Touched only on the device worker."""

    def __init__(self):
        self.stack: SourceState | None = None
        self.slots: dict[int, int] = {}  # handle id → slot

    def slot(self, handle: SourceHandle) -> int:
        if handle.id not in self.slots:
            used = set(self.slots.values())
            free = next(i for i in itertools.count() if i not in used)
            if self.stack is None or free >= self.stack.batch:
                self._grow(handle.state, max(2, 2 * (self.stack.batch if self.stack is not None else 1)))
            _write_slot(self.stack, free, handle.state)
            self.slots[handle.id] = free
        return self.slots[handle.id]

    def remove(self, handle: SourceHandle) -> None:
        self.slots.pop(handle.id, None)
        if not self.slots:
            self.stack = None

    def _grow(self, like: SourceState, capacity: int) -> None:
        def grown(t: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
            fmt = torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) else None
            new = t.new_zeros((capacity, *t.shape[1:]))
            new = new.contiguous(memory_format=fmt) if fmt is not None else new
            if old is not None:
                new[: old.shape[0]] = old
            return new

        old = self.stack
        self.stack = SourceState(
            grown(like.w_a, old and old.w_a),
            [grown(f, old.feats[i] if old else None) for i, f in enumerate(like.feats)],
            grown(like.alpha_src, old and old.alpha_src),
            grown(like.styles0, old and old.styles0),
        )


def _write_slot(stack: SourceState, k: int, state: SourceState) -> None:
    stack.w_a[k] = state.w_a[0]
    stack.alpha_src[k] = state.alpha_src[0]
    stack.styles0[k] = state.styles0[0]
    for dst, src in zip(stack.feats, state.feats, strict=True):
        dst[k] = src[0]


# ----------------------------------------------------------------------------------------------- frame core


@dataclass
class _RenderRequest:
    handle: SourceHandle
    alpha: torch.Tensor
    output: str  # "tensor" (device tensor) or "uint8" (host (n, S, S, 3) array)


def _check_precision(runner: Runner, precision: Precision) -> None:
    """A runner built by the caller computes in its own dtype: a precision that says otherwise would be a lie."""
    dtype = getattr(runner, "dtype", None)  # runners that do not say (TensorRT engines) are taken as they are
    if dtype is not None and dtype != precision.dtype:
        have, want = (str(d).removeprefix("torch.") for d in (dtype, precision.dtype))
        raise InputError(
            f"precision {precision.value} was asked for, but the runner computes in {have}: pass "
            f"precision={Precision.parse(dtype).value!r}, or load the model in {want} (load_animator(..., dtype=...), "
            "or a checkpoint path with precision=...)"
        )


class FrameCore:
    """One runner behind the process's device worker, many sources, one batched multi-source render step."""

    def __init__(
        self,
        runner: Runner,
        *,
        precision: Precision | str = Precision.FP32,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        name: str | None = None,
    ):
        if max_batch < 1 or max_wait_ms < 0:
            raise InputError(f"max_batch must be ≥ 1 and max_wait_ms ≥ 0, got {max_batch} and {max_wait_ms}")
        self.runner = runner
        self.precision = Precision.parse(precision)
        _check_precision(runner, self.precision)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1e3
        self.name = name or type(runner).__name__
        self.device = _canonical(runner.device)
        self.timer = StageTimer(self.device)
        self.worker = DeviceWorker.acquire(self.device)
        self.batch_sizes: list[int] = []  # frames per render call, for metrics (bounded: see _note_batch)
        self.frames_rendered = 0
        self._bank = SourceBank()
        self._sample_stream = None
        self._ids = itertools.count()
        self._closed = False

    @classmethod
    def load(
        cls,
        source,
        *,
        backend: str = "auto",
        device: str | torch.device = "cpu",
        precision: Precision | str = "fp32",
        size: int | None = None,
        engines=None,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        log: Callable[[str], None] | None = None,
    ) -> FrameCore:
        """A core for a checkpoint path, an Animator or an engines folder, behind the named backend."""
        from .backends import open_runner

        runner, name = open_runner(
            source, backend=backend, device=device, precision=precision, size=size, engines=engines, log=log
        )
        return cls(runner, precision=precision, max_batch=max_batch, max_wait_ms=max_wait_ms, name=name)

    # -- properties of the runner
    @property
    def size(self) -> int:
        return self.runner.size

    @property
    def motion_dim(self) -> int:
        cfg = getattr(self.runner, "config", None)
        return cfg.motion_dim if cfg is not None else 20

    # -- calls on the worker
    def _call(self, fn: Callable, *args):
        self._check_open()
        return self.worker.call(self._guarded, fn, *args)

    def _guarded(self, fn: Callable, *args):
        with torch.no_grad(), self.precision.math():
            return fn(*args)

    def add_source(self, image: torch.Tensor) -> SourceHandle:
        """Encode a source image ((1, 3, S, S) in [-1, 1]) once; the handle renders it."""
        _check_finite(image, "source image", "pixels")
        with self.timer.stage("source"):
            state = self._call(self.runner.encode_source, image)
        if state.batch != 1:
            raise InputError(f"add_source takes one image at a time, got a batch of {state.batch}")
        return SourceHandle(next(self._ids), state)

    def remove_source(self, handle: SourceHandle) -> None:
        """Forget a source (its bank slot is reused). Safe to call twice or after close."""
        if not self._closed:
            self.worker.call(self._bank.remove, handle)

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        """Motion codes (B, D) of driving images (B, 3, S, S) in [-1, 1]."""
        _check_finite(images, "driving images", "pixels")
        with self.timer.stage("motion", images.shape[0]):
            return self._call(self.runner.encode_motion, images)

    def relative_alpha(self, handle: SourceHandle, alpha_drv: torch.Tensor, alpha_start: torch.Tensor):
        return self.runner.relative_alpha(handle.state, alpha_drv, alpha_start)

    def render(self, handle: SourceHandle, alpha: torch.Tensor, output: str = "tensor") -> Future:
        """Frames for codes alpha (n, D) of one source, as a future: (n, 3, S, S) device tensor, or with
        output="uint8" a host uint8 (n, S, S, 3) numpy array (converted on the device). Requests of different sources
        waiting together are rendered in one call; requests larger than max_batch are split."""
        self._check_open()
        alpha = check_codes(alpha, self.motion_dim)
        if output not in ("tensor", "uint8"):
            raise InputError(f"output must be 'tensor' or 'uint8', got {output!r}")
        n = alpha.shape[0]
        if n > self.max_batch:  # split, and join the parts in one future
            parts = [self.render(handle, alpha[i : i + self.max_batch], output) for i in range(0, n, self.max_batch)]
            return _joined(parts)
        return self.worker.submit_batched(
            ("render", id(self)),
            self._render_batch,
            _RenderRequest(handle, alpha, output),
            group=handle.id,
            max_batch=self.max_batch,
            weight=max(n, 1),
            max_wait_s=self.max_wait_s,
        )

    def render_now(self, handle: SourceHandle, alpha: torch.Tensor, output: str = "tensor") -> torch.Tensor:
        """The result of render(...), waited for: frames (n, 3, S, S) on the device (or host uint8)."""
        return ready(self.render(handle, alpha, output).result())

    def _side_stream(self):
        """The CUDA stream LMDM sampling runs on (None on CPU), made on the worker."""
        if self.device.type != "cuda":
            return None
        if self._sample_stream is None:
            self._sample_stream = torch.cuda.Stream(self.device)
        return self._sample_stream

    def _render_batch(self, requests: list[_RenderRequest]) -> list:
        if self._sample_stream is not None:  # codes sampled on the side stream are ready before they are used
            torch.cuda.current_stream(self.device).wait_stream(self._sample_stream)
        with torch.no_grad(), self.precision.math():
            n = sum(r.alpha.shape[0] for r in requests)
            with self.timer.stage("render", n):
                if len(requests) == 1:
                    r = requests[0]
                    frames = [self.runner.render(r.handle.state, r.alpha)] if n else [_empty_frames(self, r)]
                else:
                    frames = self._render_sources(requests)
            self._note_batch(n)
            return [_output(f, r.output) for f, r in zip(frames, requests, strict=True)]

    def _render_sources(self, requests: list[_RenderRequest]) -> list[torch.Tensor]:
        slots = [self._bank.slot(r.handle) for r in requests]
        counts = [r.alpha.shape[0] for r in requests]
        alpha = torch.cat([r.alpha.to(self.device) for r in requests])
        # on the host: the runner checks its range there and moves it once (no device sync for the check)
        src_index = torch.repeat_interleave(
            torch.tensor(slots, dtype=torch.long), torch.tensor(counts, dtype=torch.long)
        )
        frames = self.runner.render(self._bank.stack, alpha, src_index)
        return list(torch.split(frames, counts))

    def _note_batch(self, n: int) -> None:
        self.frames_rendered += n
        self.batch_sizes.append(n)
        if len(self.batch_sizes) > 4096:
            del self.batch_sizes[:2048]

    def sample_chunk(self, sampler, known: torch.Tensor, generator: torch.Generator | None = None) -> Future:
        """One LMDM chunk for one stream: known (1, K, D) → codes (1, L, D), as a future. Chunks of different
        streams that use equal samplers (model, scheduler, steps, chunk) and the same K are sampled in one batched
        call; each stream's noise comes from its own generator, so its codes are those it would get alone."""
        self._check_open()
        return self.worker.submit_batched(
            ("sample", sampler.batch_key(), known.shape[1]),
            lambda items: _sample_batch(self, sampler, items),
            (known, generator),
            group=id(generator) if generator is not None else None,
            max_batch=self.max_batch,
            max_wait_s=self.max_wait_s,
        )

    def warmup(self, batches: tuple[int, ...] | None = None) -> None:
        """Run the runner's own warm-up (compiling every bucket) on the worker, before any stream starts."""
        fn = getattr(self.runner, "warmup", None)
        if fn is not None:
            self._call(fn, batches)

    def _check_open(self) -> None:
        if self._closed:
            raise LeoError("this FrameCore is closed; open a new one")

    def close(self) -> None:
        """Release the device worker (its thread ends with the last core of the device). Idempotent."""
        if not self._closed:
            self._closed = True
            self.worker.release()

    def __enter__(self) -> FrameCore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sample_batch(core: FrameCore, sampler, items: list) -> list[torch.Tensor]:
    """LMDM chunks of several streams in one call. On CUDA they are sampled on a side stream, so that the GPU
    overlaps sampling chunk k+1 with rendering chunk k (the renders of chunk k wait for its sampling only)."""
    known = torch.cat([k for k, _ in items])
    generators = [g for _, g in items]
    new_codes = (sampler.chunk - known.shape[1]) * len(items)  # the known prefix is given, not sampled
    side = core._side_stream()
    with torch.no_grad(), core.precision.math(), _on_stream(side), core.timer.stage("sample", new_codes):
        codes = sampler.sample_chunk(known, generators if len(items) > 1 else generators[0])
    if side is not None:
        codes.record_stream(torch.cuda.current_stream(core.device))  # used on the render stream next
    return list(codes.split(1))


def _on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _empty_frames(core: FrameCore, r: _RenderRequest) -> torch.Tensor:
    s = core.size
    return torch.empty((0, 3, s, s), device=core.device)


def _output(frames: torch.Tensor, output: str):
    if output == "tensor":
        return frames
    return frames_to_uint8(frames)


def frames_to_uint8(frames: torch.Tensor):
    """(n, 3, S, S) in [-1, 1] → host uint8 (n, S, S, 3) numpy array: clamp and the fixed linear map to 0…255 on
    the frames' device (a GPU sends a quarter of the bytes), from a GPU through pinned memory with no host sync
    here (`ready` waits for the copy)."""
    x = ((frames.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    if x.device.type == "cpu":
        return x.contiguous().numpy()
    host = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return _PendingHost(host, torch.cuda.current_stream(x.device).record_event())


class _PendingHost:
    """A host tensor still being copied from the device; `wait()` returns it once the copy has landed."""

    def __init__(self, tensor: torch.Tensor, event):
        self.tensor, self.event = tensor, event

    def wait(self) -> torch.Tensor:
        self.event.synchronize()
        return self.tensor.numpy()


def ready(item):
    """A rendered result ready for the consumer: waits for a pending device→host copy, joins split parts."""
    if isinstance(item, _Parts):
        parts = [ready(p) for p in item]
        return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else torch.cat(parts)
    return item.wait() if isinstance(item, _PendingHost) else item


class _Parts(list):
    """The results of a request split at max_batch, joined when the consumer takes them."""


def _joined(parts: list[Future]) -> Future:
    """One future for the parts of a split request: its result is a _Parts list (see `ready`), its error the
    first part's error."""
    out: Future = Future()
    out.set_running_or_notify_cancel()
    lock = threading.Lock()

    def done(_: Future) -> None:
        with lock:
            if out.done() or not all(p.done() for p in parts):
                return
            for p in parts:
                if p.cancelled() or p.exception() is not None:
                    out.set_exception(p.exception() if not p.cancelled() else RuntimeError("render cancelled"))
                    return
            out.set_result(_Parts(p.result() for p in parts))

    for p in parts:
        p.add_done_callback(done)
    return out


def images_on(frames, device: torch.device) -> torch.Tensor:
    """uint8 frames (N, H, W, 3) or (H, W, 3) (numpy or tensor) → float (N, 3, H, W) in [-1, 1] on `device`: the
    bytes travel as uint8 and are converted there, with the published preprocessing (io.to_model)."""
    t = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if t.dtype != torch.uint8:
        raise InputError(f"driving frames must be uint8 (H, W, 3) images, got {t.dtype}")
    if t.dim() == 3:
        t = t[None]
    t = t.to(device, non_blocking=True)
    return (t.permute(0, 3, 1, 2).float() / 255.0 - 0.5) * 2.0


def check_codes(alpha, motion_dim: int) -> torch.Tensor:
    """Motion codes must be an (N, motion_dim) floating tensor of finite values; the error names the first bad
    row."""
    if not isinstance(alpha, torch.Tensor) or alpha.dim() != 2 or alpha.shape[1] != motion_dim:
        shape = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise InputError(f"motion codes must be an (N, {motion_dim}) tensor, got {shape}")
    if not alpha.is_floating_point():
        raise InputError(f"motion codes must be floating point, got {alpha.dtype}")
    _check_finite(alpha, "motion codes", "row")
    return alpha


def first_nonfinite_row(t: torch.Tensor) -> int | None:
    """Index of the first row (along dim 0) holding NaN or ±inf, or None."""
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1) if t.numel() else None
    if bad is None or not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


def _check_finite(t: torch.Tensor, what: str, unit: str) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return
    row = first_nonfinite_row(t)
    if row is not None:
        raise InputError(
            f"{what} hold NaN or infinite values (first at {'row' if unit == 'row' else 'image'} {row}); "
            "leo_rt refuses them rather than render black frames: check where they come from"
        )
