#!/usr/bin/env bash
# The fidelity check on a GPU, sized for a short lease: profile the executor on the GPU, then as many of
# experiments/fidelity.py's 24 cells as fit a wall-clock budget (interleaved, so a partial run still
# covers both traces and every load level), and pack what it measured into a handful of files.
#
#   bash experiments/gpu_fidelity.sh OUT_DIR [BUDGET_MIN] [MODEL]
#
# OUT_DIR      where the results go: fidelity.json, fidelity.log, profile.toml, gpu.txt, and
#              steps-records.tar.gz (every cell's step logs and per-request records)
# BUDGET_MIN   minutes for the whole run, profiling included (default 8: inside a 10-minute command)
# MODEL        a model preset (default: default, weights from seed 0) or a local Hugging Face Llama
#              directory; nothing is downloaded
#
# Environment: DEVICE (default cuda; cpu runs the same steps here, for a dry run), PROFILE (a profile
# file to reuse instead of profiling), PYTHON (default python3), WHEELS (default .whl: wheels to install
# when simpy is missing).
#
# A machine with no network and no simpy (the lent GPU machines have torch, numpy, scipy, rich, psutil
# and nvidia-ml-py, not simpy): fetch the wheel first where pip works,
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl 'simpy>=4.1,<5'
# and have .whl/ travel with the tree; this script installs it into a scratch folder.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash experiments/gpu_fidelity.sh OUT_DIR [BUDGET_MIN] [MODEL]}
budget=${2:-8}
model=${3:-default}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1
mkdir -p "$out"

if ! "$py" -c "import simpy" 2>/dev/null; then
  if compgen -G "$wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/twinfer-site \
      "$wheels"/*.whl
    export PYTHONPATH=/tmp/twinfer-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_fidelity: simpy is not installed and $wheels/ holds no wheel to install it from (see the header)" >&2
    exit 2
  fi
fi

"$py" - "$device" >"$out/gpu.txt" <<'EOF'
import platform, sys
try:
    import torch
except ImportError:
    sys.exit(f"gpu_fidelity: {sys.executable} has no torch; PYTHON=... names the Python that has it")
dev = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
if dev.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit(f"gpu_fidelity: DEVICE={dev} but torch sees no CUDA device (torch {torch.__version__}); "
                 "DEVICE=cpu runs the same steps on the CPU")
    p = torch.cuda.get_device_properties(torch.device(dev))
    print(f"{dev}: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} multiprocessors")
else:
    print(f"{dev}: no GPU asked for; a dry run of the same steps")
EOF
cat "$out/gpu.txt"
if [[ $device == cuda* ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >>"$out/gpu.txt" || true
fi

work=$(mktemp -d /tmp/twinfer-gpu-fidelity.XXXXXX)
trap 'rm -rf "$work"' EXIT
args=(--device "$device" --model "$model" --loop-drift-check --budget "$budget" --out "$work")
if [[ -n ${PROFILE:-} ]]; then
  args+=(--profile "$PROFILE")
fi
status=0
"$py" experiments/fidelity.py "${args[@]}" 2>&1 | tee "$out/fidelity.log" || status=$?

# a few files, one folder deep: what a lease's output channel can carry back
[[ -f $work/fidelity.json ]] && cp "$work/fidelity.json" "$out/"
prof=$(compgen -G "$work/fidelity-profile-*.toml" | head -n 1 || true)
[[ -n $prof ]] && cp "$prof" "$out/profile.toml"
[[ -n ${PROFILE:-} ]] && cp "$PROFILE" "$out/profile.toml"
tar -czf "$out/steps-records.tar.gz" -C "$work" $(cd "$work" && ls -d steps records 2>/dev/null) 2>/dev/null || true
echo "gpu_fidelity: exit $status; results in $out: $(cd "$out" && ls | tr '\n' ' ')"
exit "$status"
