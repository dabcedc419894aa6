"""The batch viewer: the training sequences behind a Pythia step (or several).

  python -m neox_jax.batch_viewer --config.data=/data/pile-preshuffled/document \
      --config.start=1000 --config.end=1000 --config.tokenizer=/data/20B_tokenizer.json
  python -m neox_jax.batch_viewer --config.data=/data/pile-preshuffled/document \
      --config.start=0 --config.end=99 --config.save=/tmp/steps_0_99.npy

Like Pythia's ``utils/batch_viewer.py``, ``end`` is inclusive and ``save`` writes
[(end - start + 1) * batch_size, 2049] in the data's token dtype (uint16 for Pythia),
rows in training order.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The batch-viewer config (no presets)."""
    if arg not in (None, ""):
        raise ValueError(f"Unknown preset {arg!r}; configs/batch_viewer.py has none.")
    c = ml_collections.ConfigDict()
    # Pre-shuffled dataset prefix: <data>.idx plus <data>.bin or its shards. Required.
    c.data = ""
    # First step, and the last one (inclusive; -1: the same as start).
    c.start = 0
    c.end = -1
    # Sequences per step (every Pythia model: 1024).
    c.batch_size = 1024
    # Write the steps' sequences to this .npy file ("": print them instead).
    c.save = ""
    # Print text decoded with this tokenizer ("": print token ids).
    c.tokenizer = ""
    # When printing: rows shown per step, and tokens (or decoded tokens) shown per row.
    c.rows = 4
    c.tokens = 32
    return c
