"""lm-eval's own command line with the ``neox_jax`` model registered.

    python -m neox_jax.evaluation.lm_eval_cli --model neox_jax \
        --model_args checkpoint=PATH,batch_size=16 --tasks hellaswag --include_path my_tasks/

Everything after the program name is lm-eval's (``lm-eval run --help``). A plain
``lm_eval --model neox_jax`` cannot work: lm-eval 0.4 discovers models only through
imports, so this wrapper imports ``neox_jax.evaluation.lm_eval_adapter`` first.
"""

import neox_jax.evaluation.lm_eval_adapter  # noqa: F401  (registers "neox_jax")


def main() -> None:
    """Run lm-eval's CLI on ``sys.argv``."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
