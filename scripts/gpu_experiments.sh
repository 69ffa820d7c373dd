#!/usr/bin/env bash
# The GPU issue's open measurements, for a card after `scripts/gpu_check.sh` (about 6 minutes on one
# H100, estimated; its last version took 3.3). Each compares, in one run on one card:
#   - the gpu tier's tests of what changed since a card last ran it: AOMD's fused adapters (values
#     and gradients) and checkpoints copied from the card asynchronously;
#   - the training step (`benchmarks/step_anatomy.py`, AOMD modes 1 and 2, fp32 and bf16): the
#     defaults (fused adapters, now one graph for all stages) against `train.fused_adapters=false`;
#     on the H100 the fused adapters' bf16 steps left the card idle for up to 23% of the step in
#     this script's process, not in a process of their own (cause not established), so each
#     precision's step also runs alone (`benchmarks/train_step.py`);
#   - the compiled step (bf16, AOMD mode 2): `train.compile=true` as it is (standard layout; its
#     floor took 18.4 ms on an H100 against eager's 23.8, but the adapters added 5.0 ms) against
#     compiled networks fed channels_last batches, the way to 8x the reference if the adapters then
#     keep up.
#
#     bash scripts/gpu_experiments.sh [OUT_DIR]        # default: gpu-experiments/
#
# Writes OUT_DIR/summary.md and each benchmark's log and JSON. Exits 1 when a benchmark failed, 2 when
# there is no CUDA device.
set -uo pipefail
out="$(mkdir -p "${1:-gpu-experiments}" && cd "${1:-gpu-experiments}" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
rm -f "$out"/anatomy*.* "$out"/step_*.* "$out/tests.log" "$out/summary.md"   # no figure of an earlier run in this summary
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" \
  || { echo "gpu_experiments: no CUDA device is visible to PyTorch" >&2; exit 2; }

status=0
python -m pytest tests/test_gpu.py -m gpu -k "fused_adapters or holds_the_values" -q -p no:cacheprovider 2>&1 \
  | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python benchmarks/step_anatomy.py --losses aomd_mode1,aomd_mode2 --settings default,unfused_adapters \
  --json "$out/anatomy.json" 2>&1 | tee "$out/anatomy.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for precision in bf16 fp32; do
  python benchmarks/train_step.py --losses aomd_mode1,aomd_mode2 --precisions $precision --steps 15 --warmup 3 \
    --json "$out/step_$precision.json" 2>&1 | tee "$out/step_$precision.md"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
python benchmarks/step_anatomy.py --losses aomd_mode2 --precisions bf16 --settings default,compiled,compiled_cl_inputs \
  --json "$out/anatomy_compiled.json" 2>&1 | tee "$out/anatomy_compiled.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

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
tests = [l for l in (out / "tests.log").read_text().splitlines() if " passed" in l or " failed" in l or " error" in l]
print(f"fused adapters' gpu tests: {tests[-1].strip('= ') if tests else 'no result (see tests.log)'}\n")
for name, title in (("anatomy.md", "training step: fused against eager adapters"),
                    ("step_bf16.md", "bf16 step, a process of its own"), ("step_fp32.md", "fp32 step, a process of its own"),
                    ("anatomy_compiled.md", "bf16 step: eager, compiled, compiled with channels_last batches")):
    print(f"## {title}\n")
    print("\n".join(table(name)) or "no result", end="\n\n")
PY
exit $status
