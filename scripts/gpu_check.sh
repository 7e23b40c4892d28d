#!/usr/bin/env bash
# The GPU check (issue 19, item 8): what only a GPU shows, in one run of under 8 minutes.
#
#   bash scripts/gpu_check.sh prepare   # here, with PyPI: wheels for the GPU machine into .whl/
#   bash scripts/gpu_check.sh           # on the GPU machine (Python 3.12, torch there): the checks
#
# On the machine lent through the `device` tool: carry .whl and run
#   bash scripts/gpu_check.sh            (results under $OUT, else runs/gpu_check)
# Never part of CI. Record the numbers in BENCHMARKS.md ("GPU check").
#
# Checks, each under its own timeout, each writing JSON:
#   1. bf16 training samples/s of modx (finetune and Mod-X) against open_clip_train on
#      open_clip's ViT-B-16 at 224 px (scripts/bench_train.py --model ViT-B-16), batch 128;
#   2. S4D (fused, unfused), S5 and softmax attention forward+backward on CUDA at
#      L = 1024 and 4096 (scripts/bench_ssm.py --device cuda), with peak memory;
#   3. a 1-process FSDP2 smoke run (accelerate launch --use_fsdp --fsdp_version 2) of the
#      demo stream, two short phases of Mod-X;
#   4. peak GPU memory over the whole check (nvidia-smi, every 0.5 s).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PY=${PYTHON:-python3}

if [ "${1:-}" = "prepare" ]; then
  # modx's dependencies the GPU image lacks (see the device tool's KINDS.md), for CPython 3.12
  mkdir -p "$WHEELS"
  exclude="$(git rev-parse --git-common-dir)/info/exclude"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  for spec in "open_clip_torch==3.3.0" "webdataset==0.2.86" braceexpand ftfy wcwidth faiss-cpu; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$WHEELS" "$spec" \
      || { echo "gpu_check: could not download $spec"; exit 1; }
  done
  du -sh "$WHEELS"
  exit 0
fi

OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
if [ -d "$WHEELS" ]; then  # webdataset 0.2.86: what open_clip_train imports; modx reads it too
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "gpu_check: wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
$PY -c "import torch, open_clip, webdataset; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/gpu_memory.csv" &
SAMPLER=$!
start=$(date +%s)

echo "== 1. training samples/s, ViT-B-16 at 224 px, bf16"
timeout 300 $PY scripts/bench_train.py --model ViT-B-16 --precision bf16 --batch 128 --workers 8 \
  --steps 40 --warmup 5 --log-every 5 --only finetune open_clip modx --open-clip-path /tmp/site \
  --data-root /tmp/gpu_check_data --out /tmp/gpu_check_train --json "$OUT/bench_train.json"
echo "rc=$?"

echo "== 2. S4D / S5 / attention on CUDA"
timeout 120 $PY scripts/bench_ssm.py --device cuda --layers s4d s4d-unfused s5 attention \
  --lengths 1024 4096 --repeats 5 --out "$OUT/bench_ssm.json"
echo "rc=$?"

echo "== 3. FSDP2 smoke run, 1 process"
timeout 150 $PY -m accelerate.commands.launch --use_fsdp --fsdp_version 2 --num_processes 1 \
  --mixed_precision bf16 train_modx.py train.precision=bf16 train.output_dir=/tmp/gpu_check_fsdp \
  stream.data_root=/tmp/gpu_check_data train.progress=false train.log_every=20 \
  "stream.phases=[{name: digits, builtin: digits, steps: 40}, {name: shapes, builtin: shapes, steps: 40}]"
echo "rc=$?"
cp /tmp/gpu_check_fsdp/summary.json "$OUT/fsdp_summary.json" 2>/dev/null

kill $SAMPLER 2>/dev/null
$PY - "$OUT" "$start" <<'EOF'
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1])
used = [int(x) for x in (out / "gpu_memory.csv").read_text().split() if x.isdigit()]
info = {"peak_gpu_memory_mib": max(used, default=None), "seconds": time.time() - int(sys.argv[2])}
(out / "gpu_check.json").write_text(json.dumps(info, indent=1))
print(info)
EOF
