"""Train (or fine-tune) a GPT-NeoX model.

    python -m neox_jax.train --config=configs/pretrain.py:tiny --workdir=/tmp/neox_tiny
    python -m neox_jax.train --config=configs/pretrain.py:pythia-70m --workdir=... \\
        --config.data.source=indexed --config.data.paths=/data/pile --config.mesh.fsdp=-1

From GPT-NeoX YAML configs (merged as GPT-NeoX merges them; see neox_jax/neox_compat):

    python -m neox_jax.train --neox_config=pythia/160M.yml --neox_config=local_setup.yml \\
        --neox_num_gpus=32 --workdir=... [--config.x=y ...]

Any field of the config can be overridden (``--config.optimizer.lr=3e-4``). Running the
same command again resumes from the latest checkpoint in ``--workdir``.
"""

import os

from neox_jax import cli
from neox_jax.errors import UserError
from neox_jax.neox_compat.config import expand_argv


def print_sample(result, config) -> str | None:
    """Continue ``config.sample.prompt`` with the trained model; returns the text."""
    import jax

    sample_cfg = config.sample
    if not sample_cfg.prompt or not result.get("tokenizer") or jax.process_index() != 0:
        return None
    from neox_jax.data.tokenizer import load_tokenizer
    from neox_jax.inference import Generator, SamplingParams

    params = result["state"].params
    if "finetune" in config and config.finetune.method == "lora":  # params are the adapters
        from neox_jax.finetune.lora import LoraConfig, merge

        lora = LoraConfig.from_config(config.lora, result["model_config"])
        params = merge(result["state"].frozen, params, lora)
    tokenizer = load_tokenizer(result["tokenizer"])
    generator = Generator(result["model_config"], params, tokenizer)
    # The run has succeeded: a default length past a small model's context shortens the
    # sample (saying so) rather than failing the command after training.
    prompt_len = len(generator.encode(sample_cfg.prompt))
    max_new = max(1, min(sample_cfg.max_new_tokens, generator.context_length - prompt_len))
    if max_new < sample_cfg.max_new_tokens:
        print(
            f"sample.max_new_tokens={sample_cfg.max_new_tokens} and the {prompt_len}-token "
            f"prompt exceed the model's context ({generator.context_length}): sampling "
            f"{max_new} tokens."
        )
    sampling = SamplingParams(
        max_new_tokens=max_new,
        temperature=sample_cfg.temperature,
        top_k=sample_cfg.top_k,
        seed=0,
        truncate_prompt=True,
    )
    text = generator.generate([sample_cfg.prompt], sampling)[0].text
    print(f"\n--- sample (temperature {sample_cfg.temperature}, top-k {sample_cfg.top_k}) ---")
    print(sample_cfg.prompt + text)
    return text


def main(config, workdir: str) -> dict:
    """Train as ``config`` describes in ``workdir`` (resuming), then print a sample."""
    # Imported here for start-up time: flag and config errors answer before JAX loads.
    from neox_jax.finetune.trainer_hooks import trainer_hooks
    from neox_jax.training.trainer import NonFiniteLossError, train_and_evaluate

    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file; pass a folder (new or a run's).")
    try:  # fine-tuning (SFT data, LoRA) plugs into the loop through its hooks
        result = train_and_evaluate(config, workdir, hooks=trainer_hooks)
    except NonFiniteLossError as e:  # the user's hyperparameters, not a bug
        raise UserError(str(e)) from e
    if result.get("preempted"):
        print(f"Preempted at step {result['step']}: checkpoint saved in {workdir}.")
        return result
    print_sample(result, config)
    return result


COMMAND = cli.Command(
    main,
    "neox_jax.train",
    extra_flags={"workdir": (None, "Run directory: checkpoints, logs, config.")},
    required=["workdir"],
    expand=expand_argv,  # --neox_config=F.yml [--neox_num_gpus=N --neox_vocab_size=N]
)

if __name__ == "__main__":
    COMMAND.run()
