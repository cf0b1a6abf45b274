"""smml-lightning: SMML and companions for brain tumor segmentation with missing MRI modalities."""

__version__ = "0.1.0"
