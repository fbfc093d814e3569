#!/usr/bin/env bash
# A simulated 2-node Ray cluster on loopback addresses (DESIGN §4), to try the cluster flow locally:
#   head   127.0.0.2 (GCS :6379, dashboard/Jobs API http://127.0.0.2:8265), 1 CPU
#   worker 127.0.0.3, 1 CPU and the custom resource collect_node=100 (where collection actors go)
#
#   cluster/local-2node.sh start     # then: ray job submit --address http://127.0.0.2:8265 ...
#   cluster/local-2node.sh status
#   cluster/local-2node.sh stop
#
# The nodes share no folder, as separate machines would not: each has its own Ray temp dir, TMPDIR,
# HOME and SUBQ_CACHE_DIR under $SUBQ_2NODE_DIR/{head,worker}. A job brings its code as its runtime_env
# working_dir (`--working-dir .`) and keeps `out` and `store` in a bucket: export AWS_ENDPOINT_URL,
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or a profile) before `start`, so both nodes inherit them.
# With 1 CPU per node, `train.defaults.num_workers=2` puts one Train worker on each node.
#
# Settings (environment): SUBQ_2NODE_DIR (default /tmp/subq-2node; keep it short: Unix socket paths
# live under it), SUBQ_2NODE_GCS_PORT (6379), SUBQ_2NODE_DASHBOARD_PORT (8265), SUBQ_2NODE_WORKER_CPUS (1).
#
# `stop` never runs `ray stop`: that kills every Ray process on the machine (other clusters, the
# Ray of a running pytest session). Every process started here carries SUBQ_2NODE=<dir> in its
# environment; `stop` signals those processes and their descendants (Ray workers rename themselves
# and lose a readable environment, but stay children of their raylet), and nothing else.
set -euo pipefail

DIR="${SUBQ_2NODE_DIR:-/tmp/subq-2node}"
GCS_PORT="${SUBQ_2NODE_GCS_PORT:-6379}"
DASH_PORT="${SUBQ_2NODE_DASHBOARD_PORT:-8265}"
WORKER_CPUS="${SUBQ_2NODE_WORKER_CPUS:-1}"
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
unset XDG_CACHE_HOME HF_HOME TRANSFORMERS_CACHE  # a cache common to both nodes would hide a shared-disk reliance

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

node_env() {  # the node's own folders, inherited by its raylet, workers, actors (and the head's job drivers)
  mkdir -p "$1/ray" "$1/tmp" "$1/home" "$1/cache"
  echo "TMPDIR=$1/tmp HOME=$1/home SUBQ_CACHE_DIR=$1/cache"
}

start() {
  if [[ -n "$(marked_pids)" ]]; then
    echo "local-2node: already running (temp dir $DIR); use 'stop' first" >&2
    exit 1
  fi
  mkdir -p "$DIR"
  export SUBQ_2NODE="$DIR"
  # shellcheck disable=SC2046
  env $(node_env "$DIR/head") ray start --head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" \
    --include-dashboard=true --dashboard-host="$HEAD_IP" --dashboard-port="$DASH_PORT" \
    --num-cpus=1 --resources='{"head_only": 1}' --temp-dir="$DIR/head/ray" "${FREE_PORTS[@]}" --disable-usage-stats
  # shellcheck disable=SC2046
  env $(node_env "$DIR/worker") ray start --address="$HEAD_IP:$GCS_PORT" --node-ip-address="$WORKER_IP" \
    --num-cpus="$WORKER_CPUS" --resources='{"collect_node": 100}' --temp-dir="$DIR/worker/ray" \
    "${FREE_PORTS[@]}" --disable-usage-stats
  echo
  echo "local-2node: up. Jobs API: http://$HEAD_IP:$DASH_PORT   GCS: $HEAD_IP:$GCS_PORT"
  echo "  ray job submit --address http://$HEAD_IP:$DASH_PORT --working-dir . -- \\"
  echo "    subq pipeline --config quickstart --out s3://BUCKET/runs/quickstart --set store=s3://BUCKET/store \\"
  echo "      --set train.defaults.num_workers=2"
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
