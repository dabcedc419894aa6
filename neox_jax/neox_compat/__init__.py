"""Coming from GPT-NeoX: its YAML/JSON configs (``config``) and its native DeepSpeed
layer checkpoints (``checkpoint``) read into neox_jax."""
