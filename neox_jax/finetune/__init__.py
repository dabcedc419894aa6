"""Fine-tuning: SFT data with loss masks and packing, chat templates, LoRA (and QLoRA).

* ``sft_data``: jsonl (prompt/completion or chat messages) -> packed rows with
  ``segment_ids``, ``positions`` and ``loss_mask`` for the trainer (``data.source="sft"``).
* ``chat``: chat templates (a default, or a Hugging Face Jinja ``chat_template``),
  ``format_chat`` / ``encode_chat`` for generation.
* ``lora``: adapters as their own parameter tree, ``merge``, the trainable fraction.
* ``peft_format``: PEFT ``adapter_config.json`` + ``adapter_model.safetensors``, both ways.
* ``trainer_hooks``: LoRA through ``training.trainer.train_and_evaluate``.
* ``export``: ``python -m neox_jax.finetune.export`` (merged HF model, PEFT adapter).

Run: ``python -m neox_jax.train --config=configs/finetune.py:sft-lora --workdir=...
--config.train.init_from=/path/hf --config.data.sft_path=train.jsonl``.
"""

from neox_jax.finetune.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatFormatError,
    ChatTemplate,
    encode_chat,
    format_chat,
    read_chat_template,
    run_chat_template,
)
from neox_jax.finetune.lora import (
    LoraAdapter,
    LoraConfig,
    LoraError,
    abstract_adapters,
    adapter_logical_axes,
    attach,
    init_adapters,
    lora_apply_fn,
    merge,
    trainable_fraction,
)
from neox_jax.finetune.peft_format import load_peft_adapter, save_peft_adapter
from neox_jax.finetune.sft_data import (
    SFTDataError,
    SFTSource,
    SFTStats,
    load_examples,
    make_sft_sources,
    pack_rows,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ChatFormatError",
    "ChatTemplate",
    "LoraAdapter",
    "LoraConfig",
    "LoraError",
    "SFTDataError",
    "SFTSource",
    "SFTStats",
    "abstract_adapters",
    "adapter_logical_axes",
    "attach",
    "encode_chat",
    "format_chat",
    "init_adapters",
    "load_examples",
    "load_peft_adapter",
    "lora_apply_fn",
    "make_sft_sources",
    "merge",
    "pack_rows",
    "read_chat_template",
    "run_chat_template",
    "save_peft_adapter",
    "trainable_fraction",
]
