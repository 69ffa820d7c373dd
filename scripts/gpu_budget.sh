# Sourced by scripts/gpu_check.sh and scripts/gpu_experiments.sh: run a benchmark within its share of
# the script's time budget, so that the script writes its summary before a lease stops the command.
# The sourcing script sets `out` (its results folder), `budget` (its seconds, counted by $SECONDS
# from its start), `budget_variable` (the variable that sets it, for messages) and `status`.

# bench <name> <cap s> <reserve s> <log> <command...>: run <command> for at most <cap> seconds and
# at most what the budget leaves after keeping <reserve> seconds for the parts after it; its output
# goes to the terminal and OUT/<log>. A part with no time left is skipped. Skipped, stopped or
# failed, it sets status=1 and says so in its log (the summaries quote those lines).
bench() {
  local name="$1" cap="$2" reserve="$3" log="$4"; shift 4
  local left=$((budget - SECONDS - reserve))
  [ "$left" -lt "$cap" ] && cap="$left"
  if [ "$cap" -le 10 ]; then
    echo "$name: skipped, out of the script's time ($budget_variable=$budget)" | tee "$out/$log"; status=1; return 0
  fi
  timeout -k 20 "$cap" "$@" 2>&1 | tee "$out/$log"  # a job's loop saves before it stops: KILL 20 s later
  local code="${PIPESTATUS[0]}"
  [ "$code" -eq 0 ] || status=1
  { [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; } && echo "$name: stopped at its limit of $cap s" | tee -a "$out/$log"
  return 0
}
