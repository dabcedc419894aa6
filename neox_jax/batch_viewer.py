"""Print or save the training sequences of Pythia steps (Pythia's batch viewer).

  python -m neox_jax.batch_viewer --config.data=/data/pile-preshuffled/document \
      --config.start=1000 [--config.end=1010] [--config.save=steps.npy] \
      [--config.tokenizer=/data/20B_tokenizer.json]

Reads Pythia's pre-shuffled data (``neox_jax.data.preshuffled``): step ``s`` is items
``[s*B, (s+1)*B)``. Fields: configs/batch_viewer.py.
"""

import os
import tempfile

import numpy as np

from neox_jax import cli
from neox_jax.data.preshuffled import PreshuffledData
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.errors import UserError


def _steps(config, data: PreshuffledData) -> range:
    end = config.start if config.end == -1 else config.end
    if config.start < 0 or end < config.start:
        raise UserError(
            f"--config.start={config.start} --config.end={config.end}: need 0 <= start <= end "
            "(end is inclusive; -1 means start)."
        )
    if end >= data.num_steps:
        raise UserError(
            f"--config.end={end} is past the data's last step {data.num_steps - 1} "
            f"({len(data)} sequences, {data.global_batch_size} per step)."
        )
    return range(config.start, end + 1)


def save(data: PreshuffledData, steps: range, path: str) -> None:
    """Write the steps' rows to ``path`` (.npy), through a temporary file renamed at the end."""
    b, width = data.global_batch_size, data.seq_len + 1
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".batch_viewer_", suffix=".npy", dir=folder)
    os.close(fd)
    try:
        # The data's own token dtype (uint16 for Pythia), as Pythia's viewer saves it.
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=data.dtype,
                                        shape=(len(steps) * b, width))  # fmt: skip
        for n, step in enumerate(steps):  # one step at a time: memory stays one batch
            out[n * b : (n + 1) * b] = data.batch(step)
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise
    print(f"saved steps {steps.start}..{steps.stop - 1} ({len(steps) * b} x {width}) to {path}")


def show(data: PreshuffledData, steps: range, rows: int, tokens: int, tokenizer=None) -> None:
    """Print the first ``rows`` rows of each step, ``tokens`` tokens each."""
    b = data.global_batch_size
    for step in steps:
        print(f"step {step}: sequences [{step * b}, {(step + 1) * b})")
        for row in range(min(rows, b)):
            ids = data.item(step * b + row)[:tokens]
            text = repr(tokenizer.decode(ids)) if tokenizer else " ".join(map(str, ids))
            print(f"  {row}: {text}")


def main(config) -> None:
    if not config.data:
        raise UserError("--config.data is required: the pre-shuffled dataset's prefix.")
    data = PreshuffledData(config.data, config.batch_size)
    steps = _steps(config, data)
    if config.save:
        save(data, steps, config.save)
        return
    tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else None
    show(data, steps, config.rows, config.tokens, tokenizer)


COMMAND = cli.Command(main, "neox_jax.batch_viewer", default_config="batch_viewer.py")

if __name__ == "__main__":
    COMMAND.run()
