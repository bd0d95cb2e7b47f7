"""Shared data for the multi-process fine-tuning tests (test_train_dist.py, test_train_ep.py)."""

from __future__ import annotations

import json
import random


def token_data(path):
    """8 pre-tokenised documents of 21-60 tokens (ids < 512, the tiny vocabulary), the first 5 tokens prompt."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(8):
            ids = [0] + [rng.randrange(2, 512) for _ in range(rng.randrange(20, 60))]
            f.write(json.dumps({"input_ids": ids, "loss_mask": [0] * 5 + [1] * (len(ids) - 5)}) + "\n")
    return path
