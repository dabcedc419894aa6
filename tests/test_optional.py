"""A missing optional dependency names the extra to install, in one line (#14 item 6)."""

import configparser
import sys

import pytest
from helpers.train import REPO

from neox_jax import optional
from neox_jax.errors import UserError


@pytest.mark.parametrize(
    "module, extra",
    [("faiss", "retrieval"), ("torch", "hf"), ("tensorflow_datasets", "tfds"), ("wandb", "wandb")],
)
def test_missing_module_names_its_extra(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if absent
    with pytest.raises(optional.MissingDependency) as info:
        optional.require(module, "doing X")
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert message.startswith(f"doing X needs the {module} package")
    assert message.endswith(f'pip install "neox_jax[{extra}]"')


def test_every_named_extra_exists_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extras = cfg["options.extras_require"]
    for module, (package, extra) in optional.EXTRAS.items():
        assert package in extras[extra], (module, extra)


def test_a_broken_dependency_inside_a_package_is_not_disguised(monkeypatch, tmp_path):
    (tmp_path / "pkg_with_missing_dep.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz"):
        optional.require("pkg_with_missing_dep", "doing Y")


def test_the_retrieval_index_uses_it(monkeypatch):
    from neox_jax.retrieval import index

    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(optional.MissingDependency, match=r"neox_jax\[retrieval\]"):
        index._faiss()
