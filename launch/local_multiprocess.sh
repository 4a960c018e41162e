#!/usr/bin/env bash
# N local processes joined with jax.distributed (CPU collectives over gloo) - the multi-host code
# path on one machine. Usage: launch/local_multiprocess.sh N --config=... --workdir=... [flags]
set -euo pipefail
n="$1"; shift
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < n; i++)); do
  python -m launch.train --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
      --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
