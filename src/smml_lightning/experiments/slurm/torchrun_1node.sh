#!/bin/bash
# SMML on one machine with several GPUs via torchrun (Lightning picks up torchrun's environment).
# Several nodes: run this on each with --nnodes, --node_rank and --rdzv_endpoint=<host>:<port>.
set -euo pipefail
NGPU=${NGPU:-2}
torchrun --standalone --nproc_per_node="$NGPU" -m smml_lightning.cli fit --config brats2018 \
  --trainer.accelerator=gpu --trainer.devices="$NGPU" --trainer.strategy=ddp "$@"
