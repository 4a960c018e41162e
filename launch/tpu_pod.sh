#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every host; jax.distributed.initialize() discovers the
# pod topology. Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/grokking/stablemax.py --workdir=gs://bucket/run
set -euo pipefail
name="$1"; zone="$2"; shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all \
  --command="cd ~/jaxsafe && python -m launch.train --distributed${args}"
