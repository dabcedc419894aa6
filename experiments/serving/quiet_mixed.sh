#!/usr/bin/env bash
# The fifth session's figures on a quiet machine (about 7-8 minutes on 2 cores), in
# process (no HTTP), pythia-70m shape, random weights:
#  1. mixed_cost.py: a 16-slot decode call alone, with a prompt chunk of 32 / 64 / 128
#     tokens in its products (mixed prefill), and followed by the chunk's own call (the
#     engine without mixing), CPU and wall ms per call -> mixed_cost.json;
#  2. mixed_ab.py on the quarter-length workload (48 requests, prompts 32-128, outputs
#     16-64, all waiting from the start), two rounds in turns: the engine with every
#     prompt bucketed, with prompts over 64 tokens in 64-token chunks (calls of their
#     own, and mixed into the decode calls), and static batches of 16 ->
#     mixed_ab_quarter.jsonl;
#  3. the same on the issue's length mix (32 requests, prompts 32-512, outputs 16-256,
#     chunks of 128), one round -> mixed_ab_full_mix.jsonl.
# Each prints the table for README.md's "Fifth session" section.
#
#   bash experiments/serving/quiet_mixed.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=experiments/serving
python $dir/mixed_cost.py pythia-70m --chunks=32,64,128 --rounds=2 --hlo --json=$dir/mixed_cost.json
python $dir/mixed_ab.py pythia-70m --requests=48 --rounds=2 --chunks=64 \
    --json=$dir/mixed_ab_quarter.jsonl
python $dir/mixed_ab.py pythia-70m --requests=32 --rounds=1 --chunks=128 \
    --prompt-len=32,512 --output-len=16,256 --json=$dir/mixed_ab_full_mix.jsonl
