"""``max_shard_size`` means what it means in transformers' ``save_pretrained``."""

import pytest
from transformers.utils.hub import convert_file_size_to_int

from neox_jax.convert.hf import _parse_size


@pytest.mark.parametrize("size", ["5GB", "500MB", "40KB", "1GiB", "10MiB", "3KiB", 12345])
def test_sizes_count_as_transformers_counts_them(size):
    # transformers: KB/MB/GB are powers of 1000 ("5GB" = 5 * 10**9), KiB/MiB/GiB of 1024.
    assert _parse_size(size) == convert_file_size_to_int(size)


def test_bad_size_names_the_accepted_spellings():
    with pytest.raises(ValueError, match="5GB, 500MB, 1GiB"):
        _parse_size("five gigs")
