"""Suite-wide settings: one torch thread per test worker (pytest-xdist runs two workers on two cores,
and oversubscribed threads slow everything several-fold), W&B offline."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
