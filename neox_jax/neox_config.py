"""Print the neox_jax command equal to GPT-NeoX YAML/JSON configs.

    python -m neox_jax.neox_config --neox_config=pythia/160M.yml \\
        --neox_config=local_setup.yml --neox_num_gpus=32 [--config.x=y ...]

The files merge as GPT-NeoX merges them; the mapping, and the report of every key that
is ignored (with why) or unknown, are neox_jax/neox_compat/config.py's, the same that
``python -m neox_jax.train --neox_config=...`` applies. ``--neox_num_gpus`` (the GPUs of
the GPT-NeoX run) gives the global batch; ``--neox_vocab_size`` the tokenizer's size when
its file is not at hand.
"""

import shlex

from neox_jax import cli
from neox_jax.neox_compat.config import BASE_CONFIG, expand_argv


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_flags(config) -> list[str]:
    """``--config.a.b=v`` for every field of ``config`` that differs from the base config."""
    import runpy

    path, _, arg = BASE_CONFIG.rpartition(":")
    base = _flat(runpy.run_path(path)["get_config"](arg).to_dict())
    ours = _flat(config.to_dict())
    return [
        f"--config.{k}={repr(v) if isinstance(v, float) else v}"
        for k, v in ours.items()
        if base.get(k) != v
    ]


def print_command(config) -> list[str]:
    """Print ``python -m neox_jax.train`` with the overrides equal to ``config``."""
    flags = config_flags(config)
    command = ["python -m neox_jax.train --config=configs/pretrain.py:pythia-70m --workdir=RUN"]
    print(" \\\n  ".join(command + [shlex.quote(f) for f in flags]))
    return flags


COMMAND = cli.Command(print_command, "neox_jax.neox_config", "pretrain.py", expand=expand_argv)

if __name__ == "__main__":
    COMMAND.run()
