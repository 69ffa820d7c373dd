#!/usr/bin/env bash
# The GPU check: the `gpu` test tier and the GPU benchmarks in one command, within 6 minutes on one
# H100 (the GPU issue's limit, so that it fits a short GPU lease with scripts/gpu_experiments.sh
# after it): the tier in six processes, then the training step (the rows the targets read), the
# reference recipe and the data path, each within its share of the check's budget. Needs a CUDA
# device and aomd importable with its test extra (`pip install -e ".[test]"`, or the wheel plus
# pytest, pytest-xdist and execnet; without pytest-xdist the tier runs one test at a time, far
# slower, and the summary says so).
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # default: gpu-check/
#
# Writes OUT_DIR/summary.md (test result, every benchmark verdict and the seconds each part took), the
# logs (tests.log, train_step.md, recipe.md, data_path.md) and the benchmarks' JSON results. Exits 1
# when a test or a benchmark failed or was cut short, 2 when there is no CUDA device.
#
# Time (whole seconds): AOMD_GPU_CHECK_SECONDS, the whole check (default 340); AOMD_GPU_TESTS_TIMEOUT,
# the tier (default 150); AOMD_GPU_TEST_WORKERS, the tier's processes (default 6).
set -uo pipefail
check_seconds="${AOMD_GPU_CHECK_SECONDS:-340}"
tier_limit="${AOMD_GPU_TESTS_TIMEOUT:-150}"
for limit in "$check_seconds" "$tier_limit"; do
  [[ "$limit" =~ ^[0-9]+$ ]] || { echo "gpu_check: AOMD_GPU_CHECK_SECONDS and AOMD_GPU_TESTS_TIMEOUT are whole seconds, got '$limit'" >&2; exit 2; }
done
. "$(dirname "$0")/gpu_common.sh"
gpu_script_start gpu_check "${1:-gpu-check}"
# the benchmarks' dataset cache, unless AOMD_CACHE_DIR names one (the tests make their own)
export AOMD_CACHE_DIR="${AOMD_CACHE_DIR:-$scratch/cache}"
rm -f "$out"/tests.log "$out"/train_step.* "$out"/data_path.* "$out"/recipe.* "$out/times.tsv" "$out/summary.md"  # no figure of an earlier run in this summary
# each part's seconds, for the summary: where the check's minutes went
lap_start=$SECONDS
lap() { printf '%s\t%s\n' "$1" $((SECONDS - lap_start)) >> "$out/times.tsv"; lap_start=$SECONDS; }
# the tier's tests are small for a card and spend most of their time on the host (imports, entrypoint
# processes, compiling): with pytest-xdist (the test extra) they run in parallel processes
parallel=()
if python -c "import xdist" 2>/dev/null; then
  parallel=(-n "${AOMD_GPU_TEST_WORKERS:-6}" --dist loadgroup)
else
  echo "ran one test at a time: pytest-xdist is not installed" | tee -a "$out/tests.log"
fi
# stopped at its limit, the tier leaves the benchmarks their share of the check. Its tests of what
# changed since a card last ran the tier run first (AOMD_TESTS_FIRST, tests/conftest.py), in the one
# pytest run whose processes take the longest tests of both kinds side by side, so that a tier cut
# short has run those
not_yet_on_a_card="fused_adapters or holds_the_values or never_waits or samplers_draw or compiled_networks or channels_last_batches"
echo "== gpu tier, first the tests of: $not_yet_on_a_card ==" >> "$out/tests.log"
# SIGINT at the limit, not SIGTERM: pytest then still writes the failures it saw and its result line
AOMD_TESTS_FIRST="$not_yet_on_a_card" timeout -s INT -k "$KILL_GRACE" "$tier_limit" python -m pytest tests/test_gpu.py -m gpu \
  -q -rs -p no:cacheprovider --durations=8 ${parallel[@]+"${parallel[@]}"} 2>&1 | tee -a "$out/tests.log"
tier_status="${PIPESTATUS[0]}"
[ "$tier_status" -eq 0 ] || status=1
[ "$tier_status" -eq 124 ] && echo "stopped by the tier's limit of $tier_limit s (AOMD_GPU_TESTS_TIMEOUT)" | tee -a "$out/tests.log"
lap "gpu test tier"
# Each benchmark stops at its share of what is left of the check's budget (AOMD_GPU_CHECK_SECONDS),
# keeping `reserve` seconds for the parts after it; a part out of time is skipped and says so
# (scripts/gpu_common.sh). In the order of what the open targets need most: the step / floor
# ratios, the recipe, then the data path (met with a margin on both cards).
budget="$check_seconds" budget_variable=AOMD_GPU_CHECK_SECONDS
# each precision in a process of its own, its rows in 3 interleaved rounds (the script's docstring); the
# rows the targets read (the floors, AOMD) and triplet, the student alone: the gpu tier trains every
# loss option in every precision, and `python benchmarks/train_step.py` times them all, with the fp32
# standard-layout baseline of the 1.8x target (met on both cards) that the check leaves out. bf16
# first: cut at its limit, the pass left out is fp32, and the data path still has the bf16 rate
bench train_step.py 100 90 train_step.md python benchmarks/train_step.py --losses triplet,aomd_mode1,aomd_mode2 \
  --precisions bf16,fp32 --no-contiguous-baseline --rounds 3 --steps 6 --warmup 2 --json "$out/train_step.json"
lap "train_step.py"
# an inductor cache of its own: the recipe's warm-up epoch compiles AOMD's fused adapters as a first job would
bench recipe_epoch.py 90 30 recipe.md env TORCHINDUCTOR_CACHE_DIR="$scratch/inductor-recipe" python benchmarks/recipe_epoch.py \
  --json "$out/recipe.json"
lap "recipe_epoch.py"
step_rates=()  # the bf16 AOMD step's rate, which the data path must exceed 1.5 times (without it, no verdict)
[ -f "$out/train_step.json" ] && step_rates=(--train-step-json "$out/train_step.json")
bench data_loading.py 40 5 data_path.md python benchmarks/data_loading.py --to-device --seconds 5 \
  ${step_rates[@]+"${step_rates[@]}"} --json "$out/data_path.json"
lap "data_loading.py --to-device"

python - "$out" "$SECONDS" <<'PY' | tee "$out/summary.md"
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
read = lambda name: json.loads((out / name).read_text()) if (out / name).is_file() else None
tests = [l.strip("=. ") for l in (out / "tests.log").read_text().splitlines()  # pytest's result line per pass
         if re.match(r"(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)\b.* in [0-9.]+s", l) or l.startswith(("stopped by", "ran one test at a time"))]
print("# GPU check\n")
step = read("train_step.json")
print(f"device: {step['device'] if step else 'unknown'}\n")
print(f"gpu test tier (first the tests of what no card has run yet): {'; '.join(tests) if tests else 'no result (see tests.log)'}\n")
for name, log, title in (("train_step.json", "train_step.md", "training step"), ("recipe.json", "recipe.md", "reference recipe"),
                         ("data_path.json", "data_path.md", "data path")):
    result = read(name)
    lines = (result or {}).get("verdicts") or [(result or {}).get("verdict")] + (result or {}).get("lines", [])
    if (out / log).is_file():  # a part skipped or stopped at its limit says so in its log
        lines += [l for l in (out / log).read_text().splitlines() if "out of the script's time" in l or "stopped at its limit" in l]
    print(f"## {title}\n")
    print("\n".join(f"- {line}" for line in lines if line) or f"- no result (see {log})", end="\n\n")
print("## time\n")
for line in (out / "times.tsv").read_text().splitlines():
    part, seconds = line.split("\t")
    print(f"- {part}: {seconds} s")
minutes = int(sys.argv[2]) / 60
print(f"- the whole check: {sys.argv[2]} s, {minutes:.1f} min (the GPU issue asks for under 6 minutes on one H100: "
      f"{'OK' if minutes < 6 else 'MISSED'} on {step['device'] if step else 'this device'})")
PY
exit $status
