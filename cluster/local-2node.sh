#!/usr/bin/env bash
# A simulated 2-node Ray cluster on loopback addresses (DESIGN §4), to try the cluster flow locally:
#   head   127.0.0.2 (GCS :6379, dashboard/Jobs API http://127.0.0.2:8265), no collection work
#   worker 127.0.0.3 with the custom resource collect_node=100 (where collection actors go)
#
#   cluster/local-2node.sh start     # then: ray job submit --address http://127.0.0.2:8265 ...
#   cluster/local-2node.sh status
#   cluster/local-2node.sh stop
#
# Settings (environment): SUBQ_2NODE_DIR (temp dir, default /tmp/subq-2node; keep it short: Unix
# socket paths live under it), SUBQ_2NODE_GCS_PORT (6379), SUBQ_2NODE_DASHBOARD_PORT (8265),
# SUBQ_2NODE_WORKER_CPUS (2).
#
# `stop` never runs `ray stop`: that kills every Ray process on the machine (other clusters, the
# Ray of a running pytest session). Every process started here carries SUBQ_2NODE=<dir> in its
# environment; `stop` signals those processes and their descendants (Ray workers rename themselves
# and lose a readable environment, but stay children of their raylet), and nothing else.
set -euo pipefail

DIR="${SUBQ_2NODE_DIR:-/tmp/subq-2node}"
GCS_PORT="${SUBQ_2NODE_GCS_PORT:-6379}"
DASH_PORT="${SUBQ_2NODE_DASHBOARD_PORT:-8265}"
WORKER_CPUS="${SUBQ_2NODE_WORKER_CPUS:-2}"
HEAD_IP=127.0.0.2
WORKER_IP=127.0.0.3
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The project's venv if there is one: jobs resolve `subq` and `python` through the raylet's PATH.
if [[ -x "$REPO/.venv/bin/ray" ]]; then
  export PATH="$REPO/.venv/bin:$PATH"
fi
command -v ray >/dev/null || { echo "local-2node: no 'ray' on PATH (install the project first)" >&2; exit 1; }

# DESIGN §4: set before Ray starts, in every process. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (our
# single-node default) would make `ray start --address` refuse to add the worker, so unset it.
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 WANDB_MODE=offline
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER RAY_ADDRESS

# Ports the OS picks: the agent's default 52365 (it binds 127.0.0.1 too) and the metrics port clash
# between the two nodes and with any other Ray on this machine; a head without its agent's HTTP
# server answers job submissions with "No available agent to submit job".
FREE_PORTS=(--dashboard-agent-listen-port=0 --metrics-export-port=0)

marked_pids() {  # processes whose environment carries this cluster's marker
  local env pid
  for env in /proc/[0-9]*/environ; do
    pid="${env#/proc/}"; pid="${pid%/environ}"
    [[ "$pid" == "$$" ]] && continue
    if tr '\0' '\n' 2>/dev/null <"$env" | grep -qxF "SUBQ_2NODE=$DIR"; then echo "$pid"; fi
  done
}

descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null || true); do
    echo "$child"
    descendants "$child"
  done
}

cluster_pids() {
  local pid
  for pid in $(marked_pids); do
    echo "$pid"
    descendants "$pid"
  done | sort -un
}

start() {
  if [[ -n "$(marked_pids)" ]]; then
    echo "local-2node: already running (temp dir $DIR); use 'stop' first" >&2
    exit 1
  fi
  mkdir -p "$DIR"
  export SUBQ_2NODE="$DIR"
  ray start --head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" \
    --include-dashboard=true --dashboard-host="$HEAD_IP" --dashboard-port="$DASH_PORT" \
    --num-cpus=1 --resources='{"head_only": 1}' --temp-dir="$DIR/head" "${FREE_PORTS[@]}" --disable-usage-stats
  ray start --address="$HEAD_IP:$GCS_PORT" --node-ip-address="$WORKER_IP" \
    --num-cpus="$WORKER_CPUS" --resources='{"collect_node": 100}' --temp-dir="$DIR/worker" \
    "${FREE_PORTS[@]}" --disable-usage-stats
  echo
  echo "local-2node: up. Jobs API: http://$HEAD_IP:$DASH_PORT   GCS: $HEAD_IP:$GCS_PORT"
  echo "  ray job submit --address http://$HEAD_IP:$DASH_PORT --working-dir . -- subq ..."
  echo "  $0 stop"
}

stop() {
  local pids
  pids="$(cluster_pids)"
  if [[ -z "$pids" ]]; then
    echo "local-2node: nothing running for $DIR"
  else
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in 1 2 3 4 5 6; do  # raylet and GCS may wait for each other after SIGTERM
      sleep 0.5
      pids="$(for p in $pids; do kill -0 "$p" 2>/dev/null && echo "$p"; done || true)"
      [[ -z "$pids" ]] && break
    done
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
    echo "local-2node: stopped"
  fi
  rm -rf "$DIR"
}

status() {
  if [[ -z "$(marked_pids)" ]]; then
    echo "local-2node: not running"
    exit 1
  fi
  ray status --address="$HEAD_IP:$GCS_PORT"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
