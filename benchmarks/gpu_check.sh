#!/usr/bin/env bash
# The GPU check: the device tests (marked gpu), the real-scale benchmark on CUDA in bf16, and the
# server's generation step against the cache length (session_steps.py).
# Without a CUDA GPU it says so and exits 0, so it can run anywhere.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]      # writes OUT_DIR/gpu_tests.txt, real_scale_cuda.json, session_steps_cuda.json
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU that torch can use: nothing to check here"
    exit 0
fi
mkdir -p "$out"
python -c "import torch; print(torch.cuda.get_device_name(0), torch.version.cuda)" | tee "$out/device.txt"
python -m pytest -q -m gpu tests/data_party/test_devices.py 2>&1 | tee "$out/gpu_tests.txt"
python benchmarks/real_scale.py --device cuda --dtype bf16 > "$out/real_scale_cuda.json"
python benchmarks/session_steps.py --device cuda --keys 64 2048 8192 --rows 8 > "$out/session_steps_cuda.json"
echo "wrote $out/real_scale_cuda.json and $out/session_steps_cuda.json"
