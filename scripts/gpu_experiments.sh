#!/usr/bin/env bash
# The GPU issue's open measurements, for a card after `scripts/gpu_check.sh` (whose gpu tier tests what
# changed since a card last ran it). Each compares, in one run on
# one card, every precision and setting in a process of its own (`benchmarks/step_anatomy.py`), its rows
# timed in interleaved rounds:
#   - the training step (AOMD modes 1 and 2, fp32 and bf16): the defaults (fused adapters, now one
#     graph for all stages) against `train.fused_adapters=false`; on the H100 the fused adapters'
#     bf16 steps left the card idle for up to 23% of the step in a process that had run fp32 first;
#   - the compiled step (bf16, AOMD mode 2): `train.compile=true` as it is (standard layout; its
#     floor took 18.4 ms on an H100 against eager's 23.8, but the adapters added 5.0 ms) against
#     compiled networks fed channels_last batches, the way to 8x the reference if the adapters then
#     keep up.
#
#     bash scripts/gpu_experiments.sh [OUT_DIR]        # default: gpu-experiments/
#
# Within AOMD_GPU_EXPERIMENTS_SECONDS (whole seconds, default 330: with the check's 340 s, about 11
# minutes, which a 15-minute GPU lease holds with the machine's start), each part within its share
# (scripts/gpu_common.sh).
# Writes OUT_DIR/summary.md and each benchmark's log and JSON. Exits 1 when a benchmark failed or was
# cut short, 2 when there is no CUDA device.
set -uo pipefail
budget="${AOMD_GPU_EXPERIMENTS_SECONDS:-330}" budget_variable=AOMD_GPU_EXPERIMENTS_SECONDS
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "gpu_experiments: AOMD_GPU_EXPERIMENTS_SECONDS is whole seconds, got '$budget'" >&2; exit 2; }
. "$(dirname "$0")/gpu_common.sh"
gpu_script_start gpu_experiments "${1:-gpu-experiments}"
rm -f "$out"/anatomy*.* "$out/summary.md"   # no figure of an earlier run in this summary
bench step_anatomy.py 170 120 anatomy.md python benchmarks/step_anatomy.py --losses aomd_mode1,aomd_mode2 \
  --settings default,unfused_adapters --rounds 3 --steps 8 --warmup 2 --json "$out/anatomy.json"
bench "step_anatomy.py (compiled)" 200 5 anatomy_compiled.md python benchmarks/step_anatomy.py --losses aomd_mode2 \
  --precisions bf16 --settings compiled_cl_inputs,compiled --rounds 2 --steps 8 --warmup 2 --json "$out/anatomy_compiled.json"

python - "$out" <<'PY' | tee "$out/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])

def table(name):
    """The rows of the first table in a benchmark's log: its lines that start with "|", up to the
    table of kernels that step_anatomy.md has next (the passes' warnings may come between the rows)."""
    lines = (out / name).read_text().splitlines() if (out / name).is_file() else []
    end = next((i for i, line in enumerate(lines) if line.startswith("Kernels of one step")), len(lines))
    return [line for line in lines[:end] if line.startswith("|")]

anatomy = out / "anatomy.json"
print("# GPU experiments\n")
print(f"device: {json.loads(anatomy.read_text())['device'] if anatomy.is_file() else 'unknown'}\n")
for name, title in (("anatomy.md", "training step: fused against eager adapters"),
                    ("anatomy_compiled.md", "bf16 step: compiled with channels_last batches, compiled (eager: above)")):
    print(f"## {title}\n")
    cut = [line for line in ((out / name).read_text().splitlines() if (out / name).is_file() else [])
           if "out of the script's time" in line or "stopped at its limit" in line]
    print("\n".join(table(name) + cut) or "no result", end="\n\n")
PY
exit $status
