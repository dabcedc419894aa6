"""Fine-tuning: SFT data with loss masks and packing, chat templates, LoRA (and QLoRA).

* ``sft_data``: jsonl (prompt/completion or chat messages) -> packed rows with
  ``segment_ids``, ``positions`` and ``loss_mask`` for the trainer (``data.source="sft"``).
* ``chat``: chat templates (a default, or a Hugging Face Jinja ``chat_template``),
  ``format_chat`` / ``encode_chat`` for generation.
* ``lora``: adapters as their own parameter tree, ``merge``, the trainable fraction.
* ``peft_format``: PEFT ``adapter_config.json`` + ``adapter_model.safetensors``, both ways.
* ``trainer_hooks``: SFT data and LoRA through ``training.trainer.train_and_evaluate``,
  handed to it by ``python -m neox_jax.train``.
* ``export``: ``python -m neox_jax.finetune.export`` (merged HF model, PEFT adapter).

``lora`` and ``peft_format`` are formats the loader (``neox_jax.loading``) reads, so this
``__init__`` imports nothing: loading a LoRA run must not pull in the SFT data pipeline.
Import from the modules (``from neox_jax.finetune.lora import LoraConfig``).

Run: ``python -m neox_jax.train --config=configs/finetune.py:sft-lora --workdir=...
--config.train.init_from=/path/hf --config.data.sft_path=train.jsonl``.
"""
