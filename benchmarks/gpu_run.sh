#!/usr/bin/env bash
# `mixserve bench gpu` on a lent GPU machine, as one command from the repository root:
#
#     bash benchmarks/gpu_run.sh            (device tool: timeout_s 590, carry [".whl"] if made)
#     bash benchmarks/gpu_run.sh spec       (speculation on trained weights, benchmarks/gpu_spec.py: timeout_s 500)
#
# Results land in $OUT/gpu/ (gpu.json, gpu.md, gpu.png, run.log, server.log, agree-*.log and the
# kernel profile's profile.md: 8 files, the most a run returns) or, without $OUT, in
# benchmarks/results/gpu-<UTC time>/. Copy them to benchmarks/results/gpu-<time>/ and commit them.
#
# Nothing is installed from a registry there: the repository runs from its own tree (PYTHONPATH),
# the router and the shards as `python -m mixserve.cli` children that inherit it. The kernel part
# needs torch and triton alone. The server and agreement parts also need the router's imports; the GPU
# image lacks grpcio-health-checking, grpcio-reflection and llguidance, and the gRPC stubs need
# grpcio >= 1.85.1 and protobuf >= 7.35.1.
# Bring them as wheels in an ignored .whl/ (python 3.12, x86-64) and name .whl in carry:
#
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 -d .whl grpcio==1.85.1 \
#         grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 llguidance==1.9.1
#
# Without them the server part is skipped with its reason and the kernel figures still come back.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_run: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PWD/proto${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

python3 - <<'EOF' || exit 1
import importlib.util, sys
import torch
missing = [m for m in ("torch", "triton") if importlib.util.find_spec(m) is None]
if missing or not torch.cuda.is_available():
    sys.exit(f"gpu_run: needs torch and triton with a CUDA device (missing: {missing or 'none'}, "
             f"cuda available: {torch.cuda.is_available()})")
import triton
print(f"gpu_run: {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
from mixserve.benchmarks.gpu_server import missing_modules
server_missing = missing_modules()
print("gpu_run: server imports " + (f"MISSING {server_missing}: the server part will be skipped"
                                    if server_missing else "present"))
EOF

if [ "${1:-gpu}" = spec ]; then
    # `bash benchmarks/gpu_run.sh spec [SECONDS]`: speculative decoding with a draft model on trained
    # weights (benchmarks/gpu_spec.py; training ~2.5 min, five servers 20-36 s each, arms past the
    # budget skipped; default 420 s). Results in $OUT/spec/.
    budget=${2:-420}
    out=${OUT:+$OUT/spec}
    [ -n "$out" ] && mkdir -p "$out"
    timeout $((budget + 40)) python3 -m mixserve.benchmarks.gpu_spec --time-budget "$budget" ${out:+--out "$out"} \
        2>&1 | tee ${out:+"$out/run.log"}
    exit "${PIPESTATUS[0]}"
fi

out=${OUT:+$OUT/gpu}
# Under 9.5 minutes for the whole command at worst (the first H200 runs took 2.5-3.5 minutes):
# --time-budget leaves 60 s for a level in flight, the server's stop and the report; gpu.json is
# written once the kernels are done, so a timeout in the server part keeps them.
timeout 400 python3 -m mixserve.benchmarks.gpu --time-budget 340 ${out:+--out "$out"} 2>&1 | tee ${out:+"$out.log"}
status=${PIPESTATUS[0]}
[ -n "$out" ] && [ -f "$out.log" ] && mv "$out.log" "$out/run.log"
# Then the decode layer kernel by kernel and the MoE's tiles (~50 s on an H200): profile.md beside gpu.md
# (the eighth file a run returns); its JSON stays on the machine.
profile=${out:-benchmarks/results/gpu-profile-$(date -u +%Y%m%dT%H%M%SZ)}
timeout 130 python3 -m mixserve.benchmarks.gpu_profile /tmp/gpu-profile > /dev/null 2>&1 \
    && mkdir -p "$profile" && cp /tmp/gpu-profile/profile.md "$profile/profile.md" \
    || echo "gpu_run: the kernel profile did not finish (see python3 -m mixserve.benchmarks.gpu_profile)"
# Then a step's sampling with pinned against pageable host copies, and its first syncing op (~10 s):
# appended to profile.md (a run returns 8 files at most) and printed.
timeout 40 python3 -m mixserve.benchmarks.gpu_sampling /tmp/gpu-sampling \
    && mkdir -p "$profile" && cat /tmp/gpu-sampling/sampling.md >> "$profile/profile.md" \
    || echo "gpu_run: the sampling check did not finish (see python3 -m mixserve.benchmarks.gpu_sampling)"
exit "$status"
