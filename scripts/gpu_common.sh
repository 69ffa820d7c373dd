# Sourced by scripts/gpu_check.sh and scripts/gpu_experiments.sh: what both do around their parts.

# gpu_script_start NAME OUT_DIR: the results folder ($out, made), the repository as the working
# folder, a scratch folder ($scratch, removed on exit) holding the run's inductor cache, status=0;
# exits 2 when no CUDA device is visible. The inductor cache is the run's own because a compilation
# killed at a time limit can leave a damaged file in a shared cache, which a later compilation then
# fails on (seen on a CPU, in the machine's default /tmp/torchinductor_<user>).
gpu_script_start() {
  local name="$1"
  out="$(mkdir -p "$2" && cd "$2" && pwd)" || exit 2
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
  export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
  scratch="$(mktemp -d)" || exit 2
  trap 'rm -rf "$scratch"' EXIT
  export TORCHINDUCTOR_CACHE_DIR="$scratch/inductor"
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" \
    || { echo "$name: no CUDA device is visible to PyTorch" >&2; exit 2; }
  status=0
}

# seconds a part has after SIGTERM (a job's loop saves before it stops) before SIGKILL
KILL_GRACE=20

# bench <name> <cap s> <reserve s> <log> <command...>: run <command> for at most <cap> seconds and
# at most what the script's budget leaves after keeping <reserve> seconds for the parts after it
# (and KILL_GRACE for this one's own stop), so that the script ends within its budget however long
# each part would take. The sourcing script sets `budget` (its seconds, counted by $SECONDS from its
# start) and `budget_variable` (the variable that sets it, for messages). The output goes to the
# terminal and OUT/<log>. A part with no time left is skipped. Skipped, stopped or failed, it sets
# status=1 and says so in its log (the summaries quote those lines).
bench() {
  local name="$1" cap="$2" reserve="$3" log="$4"; shift 4
  local left=$((budget - SECONDS - reserve - KILL_GRACE))
  [ "$left" -lt "$cap" ] && cap="$left"
  if [ "$cap" -le 10 ]; then
    echo "$name: skipped, out of the script's time ($budget_variable=$budget)" | tee "$out/$log"; status=1; return 0
  fi
  timeout -k "$KILL_GRACE" "$cap" "$@" 2>&1 | tee "$out/$log"
  local code="${PIPESTATUS[0]}"
  [ "$code" -eq 0 ] || status=1
  { [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; } && echo "$name: stopped at its limit of $cap s" | tee -a "$out/$log"
  return 0
}
