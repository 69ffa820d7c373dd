#!/usr/bin/env bash
# The GPU issue's open measurements, for the next card after `scripts/gpu_check.sh` (about 3
# minutes on one H200, estimated). Each compares a change that the CPU cannot time with the job's
# defaults, in one run on one card:
#   - the training step (`benchmarks/step_anatomy.py`, AOMD mode 2, fp32 and bf16): the defaults,
#     deterministic mode's NaN fill put back, and AOMD's adapters as cuBLAS matrix products (with
#     the bias and ReLU added separately, and in the product's epilogue with fp32 products in TF32);
#   - the compiled step against the eager one (`benchmarks/train_step.py`, AOMD mode 2, bf16): the
#     compiled reference recipe trained at 4,276-4,574 images/s against eager's 5,198-5,262 on an
#     H200, which the step alone should explain or not.
#
#     bash scripts/gpu_experiments.sh [OUT_DIR]        # default: gpu-experiments/
#
# Writes OUT_DIR/summary.md and each benchmark's log and JSON. Exits 1 when a benchmark failed, 2 when
# there is no CUDA device.
set -uo pipefail
out="$(mkdir -p "${1:-gpu-experiments}" && cd "${1:-gpu-experiments}" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
rm -f "$out"/anatomy.* "$out"/step_*.* "$out/summary.md"   # no figure of an earlier run in this summary
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" \
  || { echo "gpu_experiments: no CUDA device is visible to PyTorch" >&2; exit 2; }

status=0
python benchmarks/step_anatomy.py --losses aomd_mode2 --settings default,nan_fill,adapters_gemm,adapters_fused \
  --json "$out/anatomy.json" 2>&1 | tee "$out/anatomy.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for variant in eager compiled; do
  args=(--losses aomd_mode2 --precisions bf16 --steps 15 --warmup 3 --json "$out/step_$variant.json")
  [ "$variant" = compiled ] && args+=(--compile)
  python benchmarks/train_step.py "${args[@]}" 2>&1 | tee "$out/step_$variant.md"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

python - "$out" <<'PY' | tee "$out/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])

def table(name):
    """The rows of the first table in a benchmark's log, up to the blank line after it (step_anatomy.md
    has a table of kernels next; warnings may come between the rows)."""
    lines = (out / name).read_text().splitlines() if (out / name).is_file() else []
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return [line for line in lines[start:end] if line.startswith("|")]

anatomy = out / "anatomy.json"
print("# GPU experiments\n")
print(f"device: {json.loads(anatomy.read_text())['device'] if anatomy.is_file() else 'unknown'}\n")
for name, title in (("anatomy.md", "training step by setting"), ("step_eager.md", "bf16 step, eager"),
                    ("step_compiled.md", "bf16 step, compiled")):
    print(f"## {title}\n")
    print("\n".join(table(name)) or "no result", end="\n\n")
PY
exit $status
