"""smml-lightning: SMML and companions for brain tumor segmentation with missing MRI modalities."""

import os

# How long OpenMP threads spin at a barrier before sleeping (libgomp, the OpenMP of PyTorch's Linux
# wheels). Its default, 300,000 spins, stalls every parallel op when another process (a data-loader
# worker, a second job) holds a core; never spinning (OMP_WAIT_POLICY=PASSIVE) costs a wake-up on each
# of the many small parallel ops of a CPU step. 10,000 spins did better than both, idle and loaded
# (docs/benchmarks.md). Only a default: it takes effect when smml_lightning is imported before torch
# (as the `smml` command does), and an OMP_WAIT_POLICY set in the environment still applies.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
