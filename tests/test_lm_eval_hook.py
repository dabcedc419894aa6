"""The start-up hook that lets lm-eval's own ``lm_eval --model neox_jax`` find the model.

Checked here: the installed ``.pth`` registers ``neox_jax`` lazily (nothing heavy is
imported until lm-eval looks the model up), a wheel built from this tree carries the
``.pth`` at its root, and the hook never breaks a program when it cannot work. The end-to-end
run of the ``lm_eval`` console script is in ``test_lm_eval.py``.
"""

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
from train_helpers import REPO

from neox_jax import _lm_eval_hook


def _python(code, cwd, *flags):
    proc = subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_lm_eval_registry_knows_neox_jax_without_importing_it(tmp_path):
    out = _python(
        "import json, sys\n"
        "import lm_eval.api.registry as r\n"
        "lazy = r.model_registry._objs.get('neox_jax')\n"
        "heavy = sorted(m for m in sys.modules if m == 'jax' or m.startswith('neox_jax.'))\n"
        "cls = r.get_model('neox_jax')\n"
        "print(json.dumps([lazy, heavy, cls.__module__ + ':' + cls.__name__]))",
        tmp_path,
    )
    lazy, heavy, resolved = json.loads(out.stdout.strip().splitlines()[-1])
    assert lazy == _lm_eval_hook.MODEL_TARGET  # a placeholder string until it is looked up
    assert heavy == ["neox_jax._lm_eval_hook"]  # neither jax nor the adapter at import
    assert resolved == _lm_eval_hook.MODEL_TARGET


def test_adapter_import_upgrades_the_placeholder_and_builtin_models_stay():
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import get_model, model_registry

    from neox_jax.evaluation.lm_eval_adapter import NeoxLM

    assert get_model("neox_jax") is NeoxLM
    assert model_registry._objs["neox_jax"] is NeoxLM
    assert get_model("hf").__name__ == "HFLM"


def test_install_is_idempotent():
    before = sum(isinstance(f, _lm_eval_hook.RegistryWatcher) for f in sys.meta_path)
    _lm_eval_hook.install()
    _lm_eval_hook.install()
    after = sum(isinstance(f, _lm_eval_hook.RegistryWatcher) for f in sys.meta_path)
    assert after == max(before, 1)


def test_a_changed_lm_eval_registry_warns_instead_of_breaking_lm_eval():
    class NoRegistry:
        pass

    with pytest.warns(UserWarning, match="lm_eval_cli"):
        _lm_eval_hook.register(NoRegistry())


def test_pth_line_is_silent_when_neox_jax_cannot_be_imported(tmp_path):
    # -S: no site-packages, so neox_jax is not importable; the line must not print or raise.
    out = _python(_lm_eval_hook.PTH_LINE + "print('ok')", tmp_path, "-S")
    assert out.stdout.strip() == "ok" and out.stderr == ""


def test_wheel_carries_the_pth_at_its_root(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "neox_jax", src / "neox_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("neox_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read(_lm_eval_hook.PTH_NAME).decode() == _lm_eval_hook.PTH_LINE
        assert "neox_jax/_lm_eval_hook.py" in z.namelist()
        record = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD")))
    assert _lm_eval_hook.PTH_NAME in record.decode()  # so pip uninstall removes it
