"""Training checkpoints: orbax ``CheckpointManager`` over ``<workdir>/checkpoints/<step>/``.

Each step directory holds four items:

* ``params``: the trained parameters (so a step directory is a model checkpoint,
  see ``neox_jax.convert.checkpoint``);
* ``model_config``: ``ModelConfig`` as JSON;
* ``train_state``: optimizer state, step and RNG;
* ``meta``: JSON with the data position and run facts (the step fully determines the
  data position, since the batch of step ``s`` is a pure function of ``s``).

orbax writes each save under a temporary name and renames it when complete, so a
save cut short is never listed as the latest step. Saves are asynchronous: training
continues while the arrays are written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from neox_jax.convert.checkpoint import MODEL_CONFIG, PARAMS
from neox_jax.errors import UserError
from neox_jax.model import ModelConfig, abstract_params
from neox_jax.model.shapes import shape_mismatches
from neox_jax.training.metrics import say
from neox_jax.training.step import TrainState

TRAIN_STATE = "train_state"
META = "meta"


def parse_steps(text: str) -> frozenset[int]:
    """``train.extra_save_steps`` ("1,2,4,512") as a set of steps >= 0."""
    try:
        steps = frozenset(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise UserError(
            f"--config.train.extra_save_steps={text!r} must be comma-separated step numbers "
            "(e.g. 1,2,4,8)."
        ) from None
    if any(s < 0 for s in steps):
        raise UserError(f"--config.train.extra_save_steps={text!r}: steps must be >= 0.")
    return steps


def _retention(keep: int, keep_period: int, extra_steps: frozenset[int]) -> dict[str, Any]:
    """Orbax options keeping the last ``keep``, every ``keep_period``-th and, always, the
    ``extra_steps`` (asked for by name, as GPT-NeoX's extra_save_iters, so never deleted)."""
    if not extra_steps or keep <= 0:  # keep <= 0 keeps everything anyway
        return dict(max_to_keep=keep if keep > 0 else None, keep_period=keep_period or None)
    policies = [cm.LatestN(keep), cm.CustomSteps(sorted(extra_steps))]
    if keep_period:
        policies.append(cm.EveryNSteps(keep_period))
    return dict(preservation_policy=cm.AnyPreservationPolicy(policies))


class Checkpointer:
    """Save every ``save_every`` steps and at ``extra_steps``; keep the last ``keep``, every
    ``keep_period``-th and the extra steps."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        save_every: int,
        keep: int = 3,
        keep_period: int = 0,
        async_save: bool = True,
        extra_steps: frozenset[int] = frozenset(),
    ):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self._last_saved: int | None = None
        self.extra_steps = frozenset(extra_steps)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, save_every),
            save_on_steps=self.extra_steps or None,
            **_retention(keep, keep_period, self.extra_steps),
            enable_async_checkpointing=async_save,
            create=True,
            # A save cut short (SIGKILL, full disk) leaves "<step>.orbax-checkpoint-tmp";
            # it is never restored, and is removed when the run restarts.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=(PARAMS, MODEL_CONFIG, TRAIN_STATE, META),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        state: TrainState,
        model_config: ModelConfig,
        meta: dict[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Save ``state`` at its step if the interval says so (or ``force``)."""
        step = int(jax.device_get(state.step))
        if step == self._last_saved or step in self.manager.all_steps():
            return False  # a forced save (preemption, the end) of a step already saved
        args = ocp.args.Composite(
            **{
                PARAMS: ocp.args.StandardSave(state.params),
                MODEL_CONFIG: ocp.args.JsonSave(model_config.to_dict()),
                TRAIN_STATE: ocp.args.StandardSave(
                    {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}
                ),
                META: ocp.args.JsonSave({**meta, "step": step}),
            }
        )
        saved = self.manager.save(step, args=args, force=force)
        if saved:
            self._last_saved = step
        if saved:
            logging.info("Saving checkpoint at step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
        """Restore onto the shardings of ``abstract_state`` (any mesh, any device count)."""
        target = {
            "opt_state": abstract_state.opt_state,
            "step": abstract_state.step,
            "rng": abstract_state.rng,
        }
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    PARAMS: ocp.args.StandardRestore(abstract_state.params),
                    TRAIN_STATE: ocp.args.StandardRestore(target),
                    META: ocp.args.JsonRestore(),
                }
            ),
        )
        ts = restored[TRAIN_STATE]
        state = abstract_state.replace(
            params=restored[PARAMS], opt_state=ts["opt_state"], step=ts["step"], rng=ts["rng"]
        )
        return state, restored[META]

    def restore_latest(
        self, abstract_state: TrainState, model_config: ModelConfig, *, allow_model_change=False
    ) -> tuple[TrainState, int] | None:
        """``(state, step)`` of the newest checkpoint that reads back, or None if none.

        A newest checkpoint that cannot be read (a disk error, files damaged after the
        save) is not fatal: the previous complete step is taken, the user is told, and
        the unreadable steps are moved to ``<workdir>/unreadable_checkpoints/`` (kept for
        inspection; the run will save those step numbers again). A different model is
        refused (``check_compatible``) rather than skipped.

        Raises:
          UserError: the model differs, or no checkpoint at all can be read.
        """
        steps, failures = self.complete_steps(), []
        for step in reversed(steps):
            try:
                saved = self.saved_model_config(step)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint
                failures.append((step, e))
                continue
            check_compatible(saved, model_config, allow_model_change=allow_model_change)
            try:
                state, _ = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001
                failures.append((step, e))
                continue
            if failures:
                self._set_aside([s for s, _ in failures], step)
            return state, step
        if failures:
            listed = "; ".join(f"step {s}: {_first_line(e)}" for s, e in failures)
            raise UserError(
                f"No checkpoint in {self.directory} can be read ({listed}). Move them away "
                "to start from scratch, or use a new --workdir."
            )
        return None

    def _set_aside(self, steps: list[int], resumed: int) -> None:
        aside = self.directory.parent / "unreadable_checkpoints"
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                (self.directory / str(step)).rename(aside / f"{step}-{time.time_ns()}")
        multihost_utils.sync_global_devices("neox_jax set aside unreadable checkpoints")
        self.manager.reload()
        say(
            f"Checkpoint step(s) {', '.join(map(str, steps))} in {self.directory} cannot be "
            f"read; resuming from step {resumed}, the newest that can. The unreadable ones "
            f"are in {aside}."
        )

    def saved_model_config(self, step: int) -> ModelConfig:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()})
        )
        return ModelConfig.from_dict(restored[MODEL_CONFIG])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def finish(self) -> Exception | None:
        """Wait for the save in flight; return its error rather than raise it.

        For exit paths that are already failing: the save in flight completes (or
        fails, and its temporary folder is never taken for a checkpoint), and the
        caller reports the original error together with this one.
        """
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - reported by the caller
            logging.error("The checkpoint save in progress failed: %s", e)
            return e
        return None

    def complete_steps(self) -> list[int]:
        """The steps whose checkpoint is complete on disk now (fresh from the directory)."""
        try:
            self.manager.reload()
            return sorted(int(s) for s in self.manager.all_steps())
        except Exception:  # noqa: BLE001 - a manager broken by a failed save
            if not self.directory.is_dir():
                return []
            return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def describe_latest(self) -> str:
        """A true sentence about what a rerun resumes from (call after ``finish``)."""
        steps = self.complete_steps()
        if not steps:
            return f"no checkpoint is complete in {self.directory}; a rerun starts from scratch"
        return (
            f"the latest complete checkpoint is step {steps[-1]} "
            f"({self.directory / str(steps[-1])}); a rerun resumes from it"
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def close_quietly(self) -> None:
        """Release the manager after ``finish`` on a failing path; never raises."""
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001 - the original error matters more
            logging.warning("Closing the checkpoint manager failed: %s", e)

    def reached_preemption(self, step: int) -> bool:
        """True on every host at the same step once any host got a preemption notice.

        JAX's preemption sync point (multi-process runs under ``jax.distributed``): the
        service catches SIGTERM on whichever host gets it and agrees on the next step
        all hosts reach, so they save together. Must be called at every step.
        """
        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # jax_enable_preemption_service is off: no notices
            return False


def check_compatible(
    saved: ModelConfig, current: ModelConfig, *, allow_model_change: bool = False
) -> None:
    """Refuse to resume a checkpoint of another model, naming the fields that differ.

    A change of parameter shapes can never resume. A change that keeps the shapes but
    changes the function (``hidden_act``, ``rotary_pct``, ``use_parallel_residual``, ...)
    resumes only with ``train.allow_model_change=True``: then it is the user's intent.
    """
    diffs = [
        f"{f}: checkpoint {getattr(saved, f)!r} vs config {getattr(current, f)!r}"
        for f in ModelConfig.architecture_fields()
        if getattr(saved, f) != getattr(current, f)
    ]
    if not diffs:
        return
    if shape_mismatches(abstract_params(current), abstract_params(saved)):
        raise UserError(
            "The checkpoint in the workdir was trained with a different model ("
            + "; ".join(diffs)
            + "). Use a new --workdir or restore the original model config."
        )
    if not allow_model_change:
        raise UserError(
            "The checkpoint in the workdir was trained with a model that computes something "
            "else (" + "; ".join(diffs) + "). Restore the original model config, use a new "
            "--workdir, or set --config.train.allow_model_change=True to resume anyway."
        )
    logging.warning("Resuming with a changed model, as allowed: %s", "; ".join(diffs))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
