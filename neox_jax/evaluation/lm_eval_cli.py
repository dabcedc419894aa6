"""lm-eval's own command line with the ``neox_jax`` model registered: ``neox-lm-eval``.

    neox-lm-eval --model neox_jax --model_args checkpoint=PATH,batch_size=16 \
        --tasks hellaswag --include_path my_tasks/
    python -m neox_jax.evaluation.lm_eval_cli ...   # the same, without installing

Every argument is lm-eval's (``lm_eval --help``). lm-eval 0.4 has no plugin discovery, so
its own ``lm_eval`` command cannot know ``neox_jax``; this console script (declared in
setup.cfg) imports the adapter, which registers the model next to lm-eval's built-in ones,
and then hands ``sys.argv`` to lm-eval's CLI. Installing neox_jax adds no start-up hook:
``lm_eval`` itself, and every other program, behaves exactly as before.
"""

import sys


def main() -> None:
    """Register ``neox_jax`` with lm-eval, then run lm-eval's CLI on ``sys.argv``."""
    # Inside main because lm-eval is an optional dependency (the `eval` extra): without it
    # the command says what to install instead of failing with an ImportError traceback.
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        print(f"neox-lm-eval: error: lm-eval is not installed ({e}); "
              "install it with: pip install 'neox_jax[eval]'", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    import neox_jax.evaluation.lm_eval_adapter  # noqa: F401  (registers "neox_jax")

    cli_evaluate()


if __name__ == "__main__":
    main()
