#!/usr/bin/env bash
# The GPU issue's open measurements, for the next card after `scripts/gpu_check.sh` (about 6
# minutes on one H100 or H200). Each compares a change that the CPU cannot time with the job's
# defaults, in one run on one card:
#   - the training step (`benchmarks/step_anatomy.py`, AOMD mode 2, fp32 and bf16): the defaults,
#     deterministic mode's NaN fill put back, and AOMD's adapters as cuBLAS matrix products (with
#     the bias and ReLU added separately, and in the product's epilogue);
#   - the reference recipe (`benchmarks/recipe_epoch.py`): evaluation reading the test split after
#     every epoch (`eval.keep_crops=false`), the defaults (crops kept on the card), and compiled
#     (static shapes: three graphs).
#
#     bash scripts/gpu_experiments.sh [OUT_DIR]        # default: gpu-experiments/
#
# Writes OUT_DIR/summary.md and each benchmark's log and JSON. Exits 1 when a benchmark failed, 2 when
# there is no CUDA device. The 6 minutes are an estimate: this script has not yet run on a card.
set -uo pipefail
out="$(mkdir -p "${1:-gpu-experiments}" && cd "${1:-gpu-experiments}" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
rm -f "$out"/anatomy.* "$out"/recipe_*.* "$out/summary.md"   # no figure of an earlier run in this summary
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" \
  || { echo "gpu_experiments: no CUDA device is visible to PyTorch" >&2; exit 2; }

status=0
python benchmarks/step_anatomy.py --losses aomd_mode2 --settings default,nan_fill,adapters_gemm,adapters_fused \
  --json "$out/anatomy.json" 2>&1 | tee "$out/anatomy.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for variant in read kept compiled; do
  case $variant in
    read) args=(--keep-crops false) ;;
    kept) args=(--keep-crops null) ;;   # the job's default: kept on the card
    compiled) args=(--compile) ;;
  esac
  python benchmarks/recipe_epoch.py "${args[@]}" --json "$out/recipe_$variant.json" 2>&1 | tee "$out/recipe_$variant.md"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

python - "$out" <<'PY' | tee "$out/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("# GPU experiments\n")
recipes = [json.loads(path.read_text()) for path in sorted(out.glob("recipe_*.json"))]
print(f"device: {recipes[0]['device'] if recipes else 'unknown'}\n")
for variant, title in (("read", "test split read after every epoch"), ("kept", "defaults: crops kept on the card"),
                       ("compiled", "compiled")):
    path = out / f"recipe_{variant}.json"
    lines = json.loads(path.read_text())["lines"] if path.is_file() else ["no result"]
    print(f"## recipe, {title}\n")
    print("\n".join(f"- {line}" for line in lines), end="\n\n")
anatomy = out / "anatomy.md"
rows = [line for line in anatomy.read_text().splitlines() if line.startswith("|")] if anatomy.is_file() else []
print("## training step\n")
print("\n".join(rows) or "no result")
PY
exit $status
