"""smml-lightning: SMML and companions for brain tumor segmentation with missing MRI modalities."""

import os

# OpenMP's default busy-waiting stalls every parallel op when another process (a data-loader worker,
# a second job) holds a core: benchmarks/speed.py measured 2-thread CPU steps up to 20x slower on a
# loaded machine. Passive waiting costs nothing measurable when the machine is quiet. Only a default:
# it takes effect when smml_lightning is imported before torch (as the `smml` command does).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
