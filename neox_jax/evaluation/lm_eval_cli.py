"""lm-eval's own command line with the ``neox_jax`` model registered.

    python -m neox_jax.evaluation.lm_eval_cli --model neox_jax \
        --model_args checkpoint=PATH,batch_size=16 --tasks hellaswag --include_path my_tasks/

Everything after the program name is lm-eval's (``lm-eval run --help``). An installed
neox_jax makes plain ``lm_eval --model neox_jax`` work through a start-up hook
(``neox_jax/_lm_eval_hook.py``); this wrapper does not depend on it (``python -S``,
a source checkout on ``PYTHONPATH``): it imports the adapter before lm-eval's CLI runs.
"""

import neox_jax.evaluation.lm_eval_adapter  # noqa: F401  (registers "neox_jax")


def main() -> None:
    """Run lm-eval's CLI on ``sys.argv``."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
