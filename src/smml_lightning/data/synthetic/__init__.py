"""Synthetic BraTS cases written as real NIfTI files in a real release's folder and file naming.

Two generators stand in for BraTS wherever the real release is absent:

- :mod:`.anatomy` (``synthesize_anatomy``): full-size 240x240x155 1 mm cases built on the MNI ICBM152
  template, each with its own deformation, tumour and scanner; the demo's and the benchmarks' data.
- :mod:`.tiny` (``synthesize``): ellipsoid heads of any size, for tests that need small volumes.
"""

from smml_lightning.data.synthetic.anatomy import anatomy_arrays, synthesize_anatomy
from smml_lightning.data.synthetic.tiny import synthesize, synthesize_arrays
from smml_lightning.data.synthetic.write import case_name

__all__ = ["anatomy_arrays", "case_name", "synthesize", "synthesize_anatomy", "synthesize_arrays"]
