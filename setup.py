"""Packaging lives in setup.cfg; this file only adds the lm-eval start-up hook.

``neox_jax-lm_eval.pth`` goes to the root of site-packages in both kinds of install, so
that lm-eval's own ``lm_eval --model neox_jax`` command finds the model (see
``neox_jax/_lm_eval_hook.py``). A wheel takes it from ``build_lib``; an editable install
(PEP 660) assembles its wheel in the folder that the ``install`` command's ``install_lib``
points at, so it is written there.
"""

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

_spec = importlib.util.spec_from_file_location(
    "_lm_eval_hook",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "neox_jax", "_lm_eval_hook.py"),
)
hook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hook)


class BuildPyWithLmEvalHook(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            root = self.get_finalized_command("install").install_lib
        else:
            root = self.build_lib
        with open(os.path.join(root, hook.PTH_NAME), "w") as f:
            f.write(hook.PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):  # not in build_lib: nothing to link there
            return outputs
        return [*outputs, os.path.join(self.build_lib, hook.PTH_NAME)]


setup(cmdclass={"build_py": BuildPyWithLmEvalHook})
