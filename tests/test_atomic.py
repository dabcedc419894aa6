"""``atomic_directory``: what every writer of a model/index/adapter folder relies on."""

import pytest

from neox_jax.atomic import atomic_directory


def test_success_replaces_and_failure_leaves_the_old_folder(tmp_path):
    dst = tmp_path / "out"
    with atomic_directory(dst) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (dst / "a.txt").read_text() == "first"

    with pytest.raises(FileExistsError, match="overwrite=True"), atomic_directory(dst):
        pass
    with (
        pytest.raises(RuntimeError, match="disk full"),
        atomic_directory(dst, overwrite=True) as tmp,
    ):
        (tmp / "a.txt").write_text("second, half written")
        raise RuntimeError("disk full")
    assert (dst / "a.txt").read_text() == "first"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left

    with atomic_directory(dst, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in dst.iterdir()) == ["b.txt"]


def test_an_empty_existing_folder_is_not_in_the_way(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "out" / "x").is_file()


def test_the_folder_gets_the_umask_permissions_not_mkdtemp_s_private_ones(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        with atomic_directory(tmp_path / "shared") as tmp:
            (tmp / "x").write_text("x")
        plain = tmp_path / "plain"
        plain.mkdir()  # what mkdir makes under the same umask is the reference
    finally:
        os.umask(old)
    mode = (tmp_path / "shared").stat().st_mode & 0o777
    assert mode == plain.stat().st_mode & 0o777 == 0o750
