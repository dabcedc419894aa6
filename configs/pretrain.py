"""Pretraining configs: ``tiny`` (the README's main job) and every published size.

    python -m neox_jax.train --config=configs/pretrain.py:tiny --workdir=/tmp/neox_tiny
    python -m neox_jax.train --config=configs/pretrain.py:pythia-160m --workdir=gs://... \\
        --config.data.source=indexed --config.data.paths=/data/pile_text \\
        --config.data.tokenizer=/data/20B_tokenizer.json --config.mesh.fsdp=-1 \\
        --config.mesh.data=1

Hyperparameters of the presets follow the Pythia paper (Biderman et al. 2023, Table 1
and appendix E; EleutherAI/pythia ``models/*.yml``) and, for ``neox-20b``, the GPT-NeoX
paper (Black et al. 2022, section 3; gpt-neox ``configs/20B.yml``).
"""

import ml_collections

from neox_jax.model.config import PRESETS, ModelConfig

# Peak learning rates from the Pythia paper (Table 1) and configs/20B.yml.
PEAK_LR = {
    "pythia-14m": 1e-3,
    "pythia-31m": 1e-3,
    "pythia-70m": 1e-3,
    "pythia-160m": 6e-4,
    "pythia-410m": 3e-4,
    "pythia-1b": 3e-4,
    "pythia-1.4b": 2e-4,
    "pythia-2.8b": 1.6e-4,
    "pythia-6.9b": 1.2e-4,
    "pythia-12b": 1.2e-4,
    "neox-20b": 0.97e-4,
    "neox-175b": 0.6e-4,  # GPT-3 175B (Brown et al. 2020, Table 2.1)
}

# Rows of 2048 tokens per step: configs/20B.yml (1538); GPT-3 175B's 3.2M tokens
# (Brown et al. 2020, Table 2.1); 1024 for every Pythia (the Pythia paper, Table 1).
GLOBAL_BATCH = {"neox-20b": 1538, "neox-175b": 1536}

# A small model that trains to a falling loss in a few minutes on 2 CPU cores; the
# fields not named here keep ModelConfig's defaults (Pythia's choices).
TINY_MODEL = dict(
    vocab_size=4096,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
)


OPTIONAL_MODEL_FIELDS = {
    "num_key_value_heads": int,
    "head_dim_override": int,
    "sliding_window": int,
    "attention_out_bias": bool,
    "moe_intermediate_size": int,
}


def model_config(arg: str) -> ml_collections.ConfigDict:
    """Every ``ModelConfig`` field (documented there), so ``--config.model.<field>=...``
    overrides any of them; published sizes compute in bfloat16 with remat."""
    if arg == "tiny":
        model = ModelConfig(**TINY_MODEL)
    else:
        model = ModelConfig.from_preset(arg, dtype="bfloat16", remat="dots_no_batch")
    block = ml_collections.ConfigDict(model.to_dict())
    # Family options whose default is None get a typed placeholder, so a flag such as
    # --config.model.num_key_value_heads=2 can set them.
    for name, kind in OPTIONAL_MODEL_FIELDS.items():
        if block[name] is None:
            block[name] = ml_collections.config_dict.placeholder(kind)
    return block


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg != "tiny" and arg not in PRESETS:
        raise ValueError(f"Unknown config {arg!r}; choose 'tiny' or one of {list(PRESETS)}.")
    tiny = arg == "tiny"
    c = ml_collections.ConfigDict()
    c.model = model_config(arg)

    c.data = ml_collections.ConfigDict()
    c.data.source = "stdlib" if tiny else "indexed"  # "stdlib" | "indexed" | "tfds" | "hf"
    c.data.paths = ""  # indexed: comma-separated dataset prefixes (<prefix>.bin/.idx)
    c.data.weights = ""  # indexed: comma-separated blend weights, one per path
    c.data.eval_paths = ""  # indexed: held-out dataset prefixes (else eval_fraction)
    c.data.eval_weights = ""  # their blend weights ("": data.weights; neox order: equal)
    c.data.eval_fraction = 0.01  # documents held out for eval when no eval_paths
    c.data.tokenizer = ""  # tokenizer.json / .model (tfds tokenizes on the fly; sampling)
    c.data.tfds_name = ""  # tfds: catalog name, e.g. "wikipedia/20230601.en"
    c.data.tfds_split = "train"
    c.data.tfds_eval_split = ""
    c.data.tfds_data_dir = ""
    c.data.hf_name = ""  # hf: a Hub dataset id, a local folder (jsonl/parquet) or save_to_disk
    c.data.hf_config = ""  # hf: the dataset's configuration (e.g. "en" for allenai/c4)
    c.data.hf_split = "train"
    c.data.hf_eval_split = ""  # hf: held-out split for eval ("": no eval)
    c.data.hf_data_files = ""  # hf: comma-separated files for builders such as "json"
    c.data.hf_streaming = True  # hf: stream (per-host shards) or prepare + index (exact)
    c.data.text_key = "text"  # tfds feature (or jsonl key) holding the text
    c.data.corpus_dir = ""  # stdlib: where the tokenizer and dataset go (default workdir/data)
    c.data.tokenizer_vocab_size = 4096  # stdlib: sentencepiece vocabulary size
    c.data.stdlib_max_mb = 12.0  # stdlib: how much source to use
    c.data.seq_len = 256 if tiny else 2048  # tokens per row (rows hold seq_len + 1)
    c.data.global_batch_size = 16 if tiny else GLOBAL_BATCH.get(arg, 1024)
    c.data.eval_batch_size = 16 if tiny else 64
    c.data.seed = 1234  # the batch of step s is a pure function of (seed, s)
    c.data.reset_at_eod = False  # True: no attention across documents, positions restart
    # indexed: "shuffled" (ours: per-epoch permutations, any number of steps) or "neox":
    # GPT-NeoX's exact doc/sample/shuffle order for train.steps x global_batch_size
    # samples, reading and writing its *_idx.npy files (neox_jax/data/neox_source.py)
    c.data.order = "shuffled"
    c.data.neox_split = "969,30,1"  # neox order, one path, no eval_paths: GPT-NeoX's split
    c.data.neox_index_dir = ""  # neox order: index files' folder ("": beside each dataset)
    c.data.neox_index = "auto"  # "auto": reuse matching files, refuse others; "new": build
    # neox order: GPT-NeoX's allow_chopped; with its packed samples it only names the index
    # files GPT-NeoX reads ("..._packedpi_ac_*" when true, "..._packedpi_*" when false)
    c.data.neox_allow_chopped = True

    c.optimizer = ml_collections.ConfigDict()
    # peak learning rate; the Llama/Qwen/Mistral presets are for continuing from their
    # checkpoints, whose own schedules are mostly unpublished: a fine-tuning scale
    c.optimizer.lr = 3e-3 if tiny else PEAK_LR.get(arg, 3e-5)
    c.optimizer.min_lr_ratio = 0.1  # cosine decays to 10% of the peak (Pythia, 20B)
    c.optimizer.warmup_steps = 30 if tiny else -1  # -1: use warmup_ratio
    c.optimizer.warmup_ratio = 0.01  # 1% of the steps (Pythia, 20B)
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.01  # not applied to biases or LayerNorm parameters
    c.optimizer.grad_clip = 1.0  # global-norm clipping
    # "cosine": optax warmup from 0 + cosine (ours); "neox": GPT-NeoX's AnnealingLR
    # (first step at lr/warmup, warmup = warmup_ratio * decay_steps unrounded), set by
    # --neox_config (neox_jax/neox_compat/config.py)
    c.optimizer.schedule = "cosine"
    c.optimizer.decay_style = "cosine"  # neox: "cosine" | "linear" | "exponential" | "constant"
    c.optimizer.decay_steps = -1  # neox: GPT-NeoX lr_decay_iters; -1 = train.steps

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200 if tiny else (150_000 if arg == "neox-20b" else 143_000)
    c.train.microbatches = 1  # gradient accumulation (a lax.scan inside the step)
    c.train.pipeline_microbatches = 0  # >0: pipeline the layers over mesh.stage (GPipe)
    c.train.log_every = 10 if tiny else 100
    c.train.eval_every = 100 if tiny else 1000
    c.train.eval_batches = 4 if tiny else 20
    c.train.save_every = 100 if tiny else 1000
    c.train.keep = 3  # keep the last K checkpoints ...
    c.train.keep_period = 0  # ... plus every M-th step (0: none)
    # Also save (and always keep) these steps, e.g. "0,1,2,4,8" (GPT-NeoX's extra_save_iters;
    # 0 saves the initial weights)
    c.train.extra_save_steps = ""
    c.train.async_checkpoint = True
    c.train.seed = 0  # parameter initialisation
    c.train.nonfinite = "stop"  # "stop" | "skip" on NaN/inf loss
    c.train.allow_model_change = False  # resume though hidden_act etc. differ from the ckpt
    c.train.init_from = ""  # Hugging Face folder or neox_jax checkpoint (if not resuming)
    c.train.peak_flops = 0.0  # per device, for MFU; 0: known accelerators, measured on CPU
    c.train.profile_steps = ""  # "10,12": jax.profiler trace of steps 10..12 -> tensorboard/
    c.train.wandb_project = ""  # Weights & Biases project to log to ("": off); needs [wandb]
    c.train.wandb_run = ""  # W&B run name ("": the workdir's name)

    c.mesh = ml_collections.ConfigDict()
    # expert: the experts of mixture-of-experts layers, and the batch, are split over it.
    for axis, size in (("data", -1), ("stage", 1), ("fsdp", 1), ("expert", 1), ("tensor", 1)):
        c.mesh[axis] = size  # devices along the axis inside a slice; -1 = the rest
        c.mesh[f"dcn_{axis}"] = 1  # across slices (multi-slice TPU / several nodes)

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # "host:port" for explicit multi-process runs
    c.distributed.num_processes = 0
    c.distributed.process_id = 0

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = "def" if tiny else ""  # printed continuation after training
    c.sample.max_new_tokens = 96
    c.sample.temperature = 0.7
    c.sample.top_k = 40
    c.lock()
    return c
