#!/bin/bash
# One rollout server per GPU on this node, each launching its own SGLang engine on that GPU.
#   rollout_node.sh CONFIG GPUS METRICS_BASE
# A server that dies is restarted (bounded), like the local supervisor does.
set -uo pipefail
CONFIG=$1; GPUS=$2; METRICS_BASE=$3
RESTARTS=${RESTARTS:-3}
HOST=$(hostname)
run_one() {
  local g=$1 tries=0
  while (( tries <= RESTARTS )); do
    CUDA_VISIBLE_DEVICES=$g areal-like rollout --config-file "$CONFIG" \
      rollout.server_id="$HOST-$g" rollout.metrics_port=$((METRICS_BASE + g)) \
      rollout.engine.port=$((30000 + g)) && return 0
    tries=$((tries + 1)); echo "rollout $HOST-$g exited; restart $tries/$RESTARTS" >&2; sleep 5
  done
}
PIDS=()
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null; wait' TERM INT
for ((g = 0; g < GPUS; g++)); do run_one "$g" & PIDS+=($!); done
wait
