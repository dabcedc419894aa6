"""The JAX variants ``bench.py --variants`` runs: name -> (extra ``XLA_FLAGS``, config.model
overrides). Each runs in its own worker process, so a flag never leaks into another."""

VARIANTS = {
    "default": ("", {}),
    "remat_dots_no_batch": ("", {"remat": "dots_no_batch"}),
    "onednn": ("--xla_cpu_use_onednn=true", {}),
    "fast_math": ("--xla_cpu_enable_fast_math=true", {}),
    "vector_width_512": ("--xla_cpu_prefer_vector_width=512", {}),
    "bf16_compute": ("", {"dtype": "bfloat16"}),
    # XLA:CPU hands most dots to YNNPACK; this gives them all to Eigen instead.
    "no_ynn": ("--xla_cpu_experimental_ynn_fusion_type=", {}),
    # The layer loop unrolled whole (model.scan_unroll >= num_hidden_layers): no
    # zero-filled [L, ...] stacks of each layer's activations for the backward pass.
    "unroll": ("", {"scan_unroll": 1_000}),
    # The head's cross entropy in one chunk (training.loss.CHUNK_TOKENS = 0).
    "unroll_one_chunk": ("", {"scan_unroll": 1_000, "loss_chunk_tokens": 0}),
    "unroll_no_ynn": ("--xla_cpu_experimental_ynn_fusion_type=", {"scan_unroll": 1_000}),
    # XLA:CPU's scheduler that orders independent ops to run side by side (on by default).
    "unroll_noconc": (
        "--xla_cpu_enable_concurrency_optimized_scheduler=false",
        {"scan_unroll": 1_000},
    ),
    # YNNPACK given the dots and elementwise fusions, not the reductions (the cross
    # entropy's and softmax's exp-sums ran as YNNPACK reductions at 1.7-8 GB/s).
    "unroll_ynn_no_reduce": (
        "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise",
        {"scan_unroll": 1_000},
    ),
    # YNNPACK given the dots alone (elementwise producers, e.g. the residual
    # gradient's sums, stay XLA's to fuse or materialise).
    "unroll_ynn_dot": ("--xla_cpu_experimental_ynn_fusion_type=dot", {"scan_unroll": 1_000}),
    "unroll_onednn": (
        "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true",
        {"scan_unroll": 1_000},
    ),
    # One XLA:CPU device per core, the batch split over them (data parallel): XLA:CPU runs
    # one op at a time per device, so two devices run two ops at once.
    "unroll_2dev": (
        "--xla_force_host_platform_device_count=2",
        {"scan_unroll": 1_000, "mesh_data": 2},
    ),
    "unroll_2dev_tensor": (
        "--xla_force_host_platform_device_count=2",
        {"scan_unroll": 1_000, "mesh_tensor": 2},
    ),
}
