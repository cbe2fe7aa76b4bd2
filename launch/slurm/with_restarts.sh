#!/bin/bash
# Run a command, restarting it when it exits non-zero, at most RESTARTS times (a rollout server
# that dies comes back, as under the local supervisor). Exit status 2 is not restarted (the
# daemon refused its settings or inputs: the same start would be refused again), as under the
# local supervisor. SIGTERM/SIGINT stop it for good, also during the back-off: the command gets
# SIGTERM and this script exits when it has. The trap signals only this script's live children
# (`jobs -p`), never a PID it has reaped (another process's by then) nor 0 (the whole group).
#   with_restarts.sh RESTARTS COMMAND [ARGS...]
set -uo pipefail
RESTARTS=$1; shift
trap 'pids=$(jobs -p); [[ -n $pids ]] && kill -TERM $pids 2>/dev/null; wait; exit 143' TERM INT
for ((tries = 0; ; tries++)); do
  "$@" &
  wait $!; code=$?
  (( code == 0 )) && exit 0
  (( code == 2 )) && { echo "$1 exited with 2 (it refused its settings or inputs): not restarted" >&2; exit 2; }
  (( tries >= RESTARTS )) && { echo "$1 exited with $code; no restarts left ($RESTARTS)" >&2; exit "$code"; }
  echo "$1 exited with $code; restart $((tries + 1))/$RESTARTS" >&2
  sleep "${RESTART_BACKOFF_S:-5}" & wait $!  # a background sleep: the trap runs at once
done
