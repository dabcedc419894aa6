"""Fine-tuning configs: supervised fine-tuning (SFT), full or LoRA, through the same trainer.

    python -m neox_jax.train --config=configs/finetune.py:sft-lora --workdir=/runs/sft \\
        --config.train.init_from=/models/pythia-410m --config.data.sft_path=train.jsonl
    python -m neox_jax.train --config=configs/finetune.py:sft-full --workdir=/runs/full \\
        --config.train.init_from=/models/pythia-410m --config.data.sft_path=train.jsonl \\
        --config.mesh.fsdp=-1 --config.mesh.data=1
    python -m neox_jax.finetune.export --config=configs/export.py --config.run=/runs/sft \\
        --config.hf_out=/out/merged --config.peft_out=/out/lora

The structure is ``configs/pretrain.py``'s (model, data, optimizer, train, mesh,
distributed, sample) plus the SFT data fields (``data.sft_*``), ``finetune`` and ``lora``.
The architecture comes from ``train.init_from`` (a Hugging Face folder, one of our
checkpoints or a run directory); the ``model`` fields set only dtype, attention kernel and
remat. QLoRA: ``--config.finetune.quantize_bits=4`` with ``sft-lora``.

The hyperparameters are common starting points for SFT, not values from a paper: LoRA
on attention with r=8, alpha=16, lr 2e-4; full fine-tuning at lr 1e-5; no weight decay.
"""

import importlib.util
from pathlib import Path

import ml_collections

PRESETS = ("sft-full", "sft-lora")


def _pretrain_config(arg: str) -> ml_collections.ConfigDict:
    # Loaded by path so this file works however the config flag loaded it.
    spec = importlib.util.spec_from_file_location(
        "_neox_pretrain_config", Path(__file__).with_name("pretrain.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "sft-lora") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"Unknown config {arg!r}; choose one of {PRESETS}.")
    lora = arg == "sft-lora"
    # Model fields of the 70m preset; init_from replaces the architecture fields.
    c = _pretrain_config("pythia-70m")
    c.unlock()

    c.data.source = "sft"  # packed jsonl examples with loss masks (neox_jax.finetune.sft_data)
    c.data.sft_path = ""  # jsonl/json/parquet: {"prompt", "completion"}, {"messages": [...]},
    #   ShareGPT or Alpaca records (neox_jax/finetune/sft_formats.py); or hf:NAME[:SPLIT], a
    #   Hugging Face dataset (Hub id, folder or file) with those fields
    c.data.sft_eval_path = ""  # held-out jsonl; else data.eval_fraction of sft_path
    c.data.eval_fraction = 0.05  # examples held out for eval when no sft_eval_path
    c.data.sft_chat_template = ""  # "": the default; or a template / tokenizer_config.json
    c.data.sft_prompt_format = "raw"  # prompt/completion: "raw" concatenation or "chat" turns
    c.data.sft_truncation = "left"  # over-long examples: "left" | "right" | "drop" (counted)
    c.data.sft_bad_lines = "error"  # malformed jsonl lines: "error" (list them) | "skip"
    c.data.sft_add_eos = True  # end raw completions with the eos token (learn to stop)
    c.data.tokenizer = ""  # "": the tokenizer beside train.init_from
    c.data.seq_len = 1024  # tokens per packed row (rows hold seq_len + 1)
    c.data.global_batch_size = 32
    c.data.eval_batch_size = 32

    c.optimizer.lr = 2e-4 if lora else 1e-5
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.warmup_steps = -1
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 1.0

    c.train.steps = 1000
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.eval_batches = 8
    c.train.save_every = 200
    c.train.init_from = ""  # the model to fine-tune (required unless resuming a run)

    c.finetune = ml_collections.ConfigDict()
    c.finetune.method = "lora" if lora else "full"  # "full": every weight; "lora": adapters
    c.finetune.quantize_bits = 0  # LoRA only: 8 or 4 quantizes the frozen base (QLoRA)
    c.finetune.quant_group_size = 0  # 0: neox_jax.quant's default for the bit width

    c.lora = ml_collections.ConfigDict()
    # "attention": the model's attention projections, whatever its family names them
    # (query_key_value,dense on GPT-NeoX; q_proj,k_proj,v_proj,o_proj on Llama, Mistral,
    # Qwen); "mlp" its MLP (or experts'), "all" both; or names: dense_h_to_4h, gate_proj, ...
    c.lora.targets = "attention"
    c.lora.rank = 8
    c.lora.alpha = 16.0  # update = alpha / rank * A @ B
    c.lora.dropout = 0.05  # on the adapter input, training only
    c.lora.init = "kaiming"  # A's init as PEFT: "kaiming" (default) | "gaussian"
    c.lora.rslora = False  # scale alpha / sqrt(rank) instead (rsLoRA)

    c.sample.prompt = ""  # no sample after training (export, then neox_jax.sample)
    c.lock()
    return c
