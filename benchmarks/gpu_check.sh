#!/usr/bin/env bash
# GPU machine check (the device tool): installs nothing. Lays the package out in a temporary folder (kernels/ and
# export/ placed as leo_rt.kernels / leo_rt.export, as the install would), then
#   1. the renderer on CUDA: fast form (Triton warp op) against the published form, and its frame time;
#   2. correctness of the compiled Triton kernels against the reference (bench_warp.py --check);
#   3. the warp benchmark table; 4. `leo-rt bench` on the GPU (its table printed last). Within 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
cp -r leo_rt "$src/leo_rt"
cp -r kernels "$src/leo_rt/kernels"
cp -r export "$src/leo_rt/export"
export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-$src}"

python - <<'PY'
import time, torch
from leo_rt import Animator
from leo_rt.kernels import triton_available
print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton available: {triton_available()}")
for dtype in (torch.float32, torch.float16):
    anim = Animator.random("lia-256", device="cuda", dtype=dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    src = torch.rand(1, 3, 256, 256, device="cuda", generator=g) * 2 - 1
    alpha = torch.randn(8, 20, device="cuda", generator=g)
    state = anim.encode_source(src)
    with torch.no_grad():
        w_a, feats = anim.reference.encode_app(src.to(dtype))
        ref = anim.reference.decode(w_a.expand(8, -1), alpha.to(dtype), [f.expand(8, -1, -1, -1) for f in feats])
    out = anim.render(state, alpha)
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    for _ in range(3):
        anim.render(state, alpha)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        anim.render(state, alpha)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / 10 / 8 * 1e3
    print(f"renderer {dtype}: fast vs published rel err {err:.2e}; {ms:.2f} ms/frame at batch 8 (eager)")
PY

timeout 180 python benchmarks/bench_warp.py --check --json "$out/bench_warp.json"

# 4. the whole bench on the GPU (printed last): eager and compiled (CUDA graphs) backends, fp16, 256
timeout 270 python -m leo_rt.cli bench --device cuda --backends torch,compile --sizes 256 --batches 1,8,32 \
    --precision fp16 --frames 20 --json "$out/bench.json" --plot "$out/bench.png"
