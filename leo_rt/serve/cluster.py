"""leo_rt on Ray Serve: the `leo-rt serve` API on many replicas and machines (`leo-rt serve --ray [ADDRESS]`).

Three deployments make one Serve application (`build_app`, leo_rt/serve/deployments.py):

    Ingress ──(multiplexed_model_id = session id, stream=True)──► Renderer × N ──► one FrameCore per replica
       │  the FastAPI app of leo-rt serve (leo_rt.serve.remote)      │  sessions batched inside the core
       └────────────────────────────► SessionStore ◄────────────────┘  (rebuild a session it does not hold)

- **Renderer** (N replicas, `num_gpus`/`num_cpus` fractional, autoscaling): one `Engine` (one FrameCore, the LMDM)
  per replica. A session is a Ray Serve *multiplexed model*: its id routes its requests to the replica that
  holds it, and the replica's LRU (`sessions_per_replica`) evicts idle ones. Multiplexed routing is a preference,
  not a pin (a busy or dead replica's sessions go elsewhere), so every replica can rebuild any session from the
  store: the source image is encoded again and motion goes on from the state the request carries.
  Frames of all sessions of a replica are batched by its FrameCore (not `@serve.batch`, which splits batches by
  multiplexed model id since Ray 2.5x).
- **Ingress** (one or more replicas): the HTTP/WebSocket API of `leo-rt serve` (leo_rt/serve/app.py's app over
  sessions kept in the cluster; LiveSession pacing and controls). It asks a replica for frames one *segment* at a
  time, as a streaming response whose every item carries the motion state after it; when a replica dies
  mid-segment the ingress asks again from the last state it received, any replica rebuilds the session, and the
  client sees a pause, not an error.
- **SessionStore** (one small replica): each session's source image (at the model size), options and last
  motion state, outside any ingress's memory, so another ingress replica can take a session over.

Modules: this one (the config and the entry points; imports Ray only when run), `deployments` (the three
deployments), `remote` (the ingress's sessions), `resume` (LMDM motion that goes on anywhere).

Multi-node: `ray start --head` on one machine, `ray start --address HEAD:6379` on each GPU machine, then
`serve deploy deploy/serve_config.yaml` (or `leo-rt serve --ray HEAD:6379`). See deploy/serve_config.yaml.

Named `cluster` rather than `ray`: a module `leo_rt/serve/ray.py` would be imported instead of Ray itself by any
script run from inside leo_rt/serve/ (its folder comes first on sys.path), and names like `leo_rt.serve.ray.Ray`
read badly.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from dataclasses import dataclass, field

from ..errors import BackendUnavailable, InputError
from .config import ServeConfig

APP_NAME = "leo_rt"


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class ClusterConfig:
    """The model (as `leo-rt serve`), the deployments, and the HTTP limits (`serve`, a ServeConfig)."""

    checkpoint: str | None = None  # None: random weights of `preset` (announced by every replica)
    lmdm: str | None = None  # None: an untrained LMDM (announced)
    preset: str = "lia-128"
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    engines: str | None = None
    max_batch: int = 32  # frames per batched render call of a replica (all its sessions)
    max_wait_ms: float = 2.0
    replicas: int = 1  # renderer replicas (fixed), unless max_replicas is set (autoscaling)
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 4.0  # autoscaling: streaming sessions per replica it aims for
    gpus_per_replica: float = 0.0  # fractional: several replicas share a GPU
    cpus_per_replica: float = 1.0
    ingress_replicas: int = 1
    cpus_per_ingress: float = 0.5
    sessions_per_replica: int = 8  # each replica's LRU of sessions (multiplexed models)
    segment_frames: int = 16  # frames per streaming request; a request in flight ahead of the client at most
    recovery_timeout_s: float = 60.0  # how long a session waits for a replica after its own died
    torch_threads: int | None = None  # per renderer replica; None: its CPU share, at least 1
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self):
        if isinstance(self.serve, dict):
            self.serve = ServeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.serve.items()})
        for name in ("replicas", "ingress_replicas", "sessions_per_replica", "segment_frames", "max_batch"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_replicas is not None:
            lo = self.min_replicas if self.min_replicas is not None else 1
            if not 0 <= lo <= self.max_replicas or self.max_replicas < 1:
                raise InputError(f"need 0 ≤ min_replicas ≤ max_replicas ≥ 1, got {lo} and {self.max_replicas}")
        if self.gpus_per_replica < 0 or self.cpus_per_replica <= 0 or self.cpus_per_ingress <= 0:
            raise InputError("gpus_per_replica must be ≥ 0 and the CPU shares > 0")
        if self.target_ongoing_requests <= 0 or self.recovery_timeout_s <= 0:
            raise InputError("target_ongoing_requests and recovery_timeout_s must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClusterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown cluster settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def fit_cpus(self, cpus: float) -> ClusterConfig:
        """The same config with its CPU shares scaled down so that every replica fits `cpus` (a 2-core machine
        runs two renderer replicas and an ingress with fractional shares). Unchanged when they fit."""
        n = self.max_replicas if self.max_replicas is not None else self.replicas
        need = n * self.cpus_per_replica + self.ingress_replicas * self.cpus_per_ingress
        if need <= cpus:
            return self
        f = 0.95 * cpus / need
        return dataclasses.replace(
            self, cpus_per_replica=self.cpus_per_replica * f, cpus_per_ingress=self.cpus_per_ingress * f
        )


# ---------------------------------------------------------------------------------------------------- the app


def build_app(config: ClusterConfig):
    """The Serve application (Ingress → Renderer × N, both → SessionStore) for serve.run."""
    return _deployments().build_app(config)


def app_builder(args: dict):
    """`serve deploy` / `serve run` entry (import_path leo_rt.serve.cluster:app_builder): the application
    arguments of the config file are ClusterConfig fields (with `serve` holding ServeConfig fields)."""
    return build_app(ClusterConfig.from_dict(dict(args or {})))


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise BackendUnavailable('leo-rt serve --ray needs Ray Serve: pip install "leo_rt[ray]"') from None
    return ray, serve


def _deployments():
    _ray()
    from . import deployments

    return deployments


# --------------------------------------------------------------------------------------------------- running


def run_cluster(
    config: ClusterConfig,
    address: str | None = None,
    *,
    name: str = APP_NAME,
    block: bool = True,
    num_cpus: float | None = None,
    log=print,
):
    """`leo-rt serve --ray [ADDRESS]`: connect to the Ray cluster at ADDRESS (`auto`: the one this machine
    belongs to), or start a local one when ADDRESS is None, and run the application there at
    http://HOST:PORT/ (config.serve.host/port). With block=True, serve until interrupted, then delete the
    application (and stop the local cluster); otherwise return the ingress handle."""
    ray, serve = _ray()
    local = address in (None, "", "local")
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local" if local else address,  # "local": a new cluster, never one found on this machine
            num_cpus=num_cpus if local else None,
            include_dashboard=False if local else None,
            log_to_driver=True,
        )
    resources = ray.cluster_resources()
    if local:
        config = config.fit_cpus(resources.get("CPU", 1.0))
    if config.gpus_per_replica == 0 and (
        str(config.device).startswith("cuda") or (config.device == "auto" and resources.get("GPU", 0) > 0)
    ):
        # Ray hides the GPUs from an actor that asked for none: a CUDA replica needs its share named
        config = dataclasses.replace(config, gpus_per_replica=1.0)
        log("renderer replicas get one GPU each (--gpus-per-replica 0.5 puts two on a GPU)")
    stop, handlers = threading.Event(), {}
    if block and threading.current_thread() is threading.main_thread():  # Ctrl-C and `kill` end it cleanly,
        for sig in (signal.SIGINT, signal.SIGTERM):  # during start-up too (it stops once the app is up)
            handlers[sig] = signal.signal(sig, lambda *_: stop.set())
    s = config.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    if config.checkpoint is None:
        log(f"WARNING: no --checkpoint: the replicas serve RANDOM weights ({config.preset})")
    handle = serve.run(build_app(config), name=name, route_prefix="/")
    n = f"{config.min_replicas or 1}…{config.max_replicas}" if config.max_replicas is not None else config.replicas
    log(
        f"leo-rt serve --ray: http://{s.host}:{s.port}/ on {'a local Ray cluster' if local else address} "
        f"(renderer replicas: {n}, ingress replicas: {config.ingress_replicas}, up to {s.max_sessions} sessions)"
    )
    if not block:
        return handle
    try:
        while not stop.wait(1.0):
            pass
        log("leo-rt serve --ray: stopping")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        serve.delete(name)
        if local and started:
            serve.shutdown()
            ray.shutdown()
    return None


def add_cluster_arguments(p) -> None:
    """The options `leo-rt serve --ray` adds to those of `leo-rt serve`."""
    d = ClusterConfig()
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on Ray Serve: on the cluster at ADDRESS (auto: the one this machine joined), or on a "
        "local one without it",
    )
    p.add_argument("--replicas", type=int, default=d.replicas, help="renderer replicas (default: 1)")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest renderer replicas")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most renderer replicas (enables it)")
    p.add_argument(
        "--target-sessions",
        type=float,
        default=d.target_ongoing_requests,
        help="autoscaling: streaming sessions per replica to aim for (default: 4)",
    )
    p.add_argument(
        "--gpus-per-replica",
        type=float,
        default=d.gpus_per_replica,
        help="fractional GPUs (0.5: two replicas share a GPU); default: 1 where replicas use CUDA (--device cuda, "
        "or auto on a cluster with GPUs), else 0",
    )
    p.add_argument("--cpus-per-replica", type=float, default=d.cpus_per_replica, help="default: 1")
    p.add_argument("--ingress-replicas", type=int, default=d.ingress_replicas, help="default: 1")
    p.add_argument(
        "--sessions-per-replica",
        type=int,
        default=d.sessions_per_replica,
        help=f"each replica's LRU of live sessions (default: {d.sessions_per_replica})",
    )


def config_from_args(args) -> ClusterConfig:
    from .command import config_from_args as serve_config

    return ClusterConfig(
        checkpoint=args.checkpoint,
        lmdm=args.lmdm,
        preset=args.preset,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        engines=args.engines,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_sessions,
        gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica,
        ingress_replicas=args.ingress_replicas,
        sessions_per_replica=args.sessions_per_replica,
        serve=serve_config(args),
    )


def run_cluster_from_args(args) -> int:
    """What `leo-rt serve --ray [ADDRESS]` calls (the parser has add_serve_arguments and add_cluster_arguments)."""
    run_cluster(config_from_args(args), None if args.ray == "local" else args.ray)
    return 0
