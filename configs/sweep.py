"""A sweep: a grid (or a random search) of training-config overrides, one run each.

  python -m neox_jax.sweep --config=configs/sweep.py \
      --config.train_config=configs/pretrain.py:tiny --workdir=/tmp/sweep \
      --config.grid="optimizer.lr=1e-3,3e-3;model.num_hidden_layers=2,4" \
      --config.parallel=2 -- --config.train.steps=40

Arguments after ``--`` go to every run unchanged (the same as ``train_args``). The old
spelling (``--config=configs/pretrain.py:tiny --grid=... --parallel=2``) still works.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The sweep config (no presets)."""
    if arg not in (None, ""):
        raise ValueError(f"Unknown preset {arg!r}; configs/sweep.py has none.")
    c = ml_collections.ConfigDict()
    # The training config every run uses (neox_jax.train's --config). Required.
    c.train_config = ""
    # Axes split by ";", each key=v1,v2,... (a training-config field and its values);
    # with random > 0 a value may be a range: uniform(a,b), loguniform(a,b), randint(a,b).
    c.grid = ""
    # Runs at a time (after the first, which prepares the shared corpus alone).
    c.parallel = 1
    # K > 0: a random search of K points drawn from the axes instead of the cross product.
    c.random = 0
    # Seeds the random search.
    c.seed = 0
    # Flags given to every run, e.g. "--config.train.steps=40" (a grid key wins over these).
    c.train_args = ""
    return c
