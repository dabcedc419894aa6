"""The README's two commands stay true: CI runs exactly the test command."""

import re
from pathlib import Path

import pytest

from configs.pretrain import get_config
from neox_jax.model import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def _commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_ci_runs_the_readme_test_command():
    _, test_cmd = _commands()
    assert "pytest" in test_cmd
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_main_command_uses_an_existing_config():
    main_cmd, _ = _commands()
    match = re.search(r"--config=(\S+?):(\S+)", main_cmd)
    assert match and (REPO / match.group(1)).is_file()
    config = get_config(match.group(2))
    assert config.data.source == "stdlib" and config.sample.prompt


@pytest.mark.parametrize("arg", ["tiny", "pythia-14m", "pythia-1b", "neox-20b"])
def test_pretrain_configs_build_valid_models(arg):
    config = get_config(arg)
    ModelConfig.from_dict(config.model.to_dict())  # validates
    with pytest.raises(AttributeError):
        config.optimizer.learning_rate = 1.0  # locked: typos fail


def test_unknown_config_name():
    with pytest.raises(ValueError, match="Unknown config 'pythia-7b'"):
        get_config("pythia-7b")
