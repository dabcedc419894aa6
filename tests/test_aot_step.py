"""``neox_jax.aot`` compiles the step that trains: both go through
``training.step.build_train_step``, so the program aot lowers for a config is the
program the trainer runs for it (accumulation, non-finite skipping, pipelining)."""

import jax
from helpers.train import tiny_config, write_dataset

from neox_jax import aot
from neox_jax.training import trainer


def test_aot_lowers_exactly_the_trainers_step(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data")
    config = tiny_config(
        data,
        **{"train.steps": 1, "train.microbatches": 2, "train.nonfinite": "skip"},
    )
    seen = []
    real = trainer.build_train_step

    def spy(*args, **kwargs):  # the trainer's own step, lowered on its real inputs
        step = real(*args, **kwargs)

        def run(state, batch):
            seen.append(step.lower(state, batch).as_text())
            return step(state, batch)

        return run

    monkeypatch.setattr(trainer, "build_train_step", spy)
    trainer.train_and_evaluate(config, tmp_path / "run")
    assert len(seen) == 1
    assert aot.lower_train_step(config, jax.devices())[0].as_text() == seen[0]

    # The comparison sees the options: the "stop" policy is a different program.
    config.unlock()
    config.train.nonfinite = "stop"
    assert aot.lower_train_step(config, jax.devices())[0].as_text() != seen[0]
