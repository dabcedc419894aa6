"""README commands that ``test_bad_inputs.test_readme_command_lines_parse`` does not parse
(those written inline in the prose, and sweeps, whose runs get their flags later) name real
config fields: each ``--config.a.b=v``, and each sweep grid key, exists in the config of the
command's ``--config=configs/<file>.py[:arg]``, so a documented override is never a typo
that the locked config would reject at run time."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    inline = [m.replace("\n", " ") for m in re.findall(r"`([^`]*python -m neox_jax[^`]*)`", prose)]
    sweeps = [line for line in lines if "python -m neox_jax.sweep" in line]
    return [c for c in inline + sweeps if "python -m neox_jax" in c and "--config=configs/" in c]


def _config(spec: str):
    file, _, arg = spec.partition(":")
    module = importlib.util.spec_from_file_location(f"_readme_{Path(file).stem}", REPO / file)
    loaded = importlib.util.module_from_spec(module)
    module.loader.exec_module(loaded)
    return loaded.get_config(arg) if arg else loaded.get_config()


def _fields(command: str) -> tuple[str, list[str]]:
    args = shlex.split(command.split("#")[0])
    spec = next(a.split("=", 1)[1] for a in args if a.startswith("--config=configs/"))
    fields = [a.split("=", 1)[0].removeprefix("--config.") for a in args
              if a.startswith("--config.")]  # fmt: skip
    for grid in (a.split("=", 1)[1] for a in args if a.startswith("--grid=")):
        fields += [axis.split("=", 1)[0].strip() for axis in grid.split(";") if axis.strip()]
    return spec, fields


COMMANDS = _commands()


def test_the_readme_documents_commands():
    assert len(COMMANDS) >= 2
    assert any("neox_jax.sweep" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=range(len(COMMANDS)))
def test_every_documented_override_is_a_field_of_its_config(command):
    spec, fields = _fields(command)
    config = _config(spec)
    for field in fields:
        node = config
        for part in field.split("."):
            assert part in node, f"README: {field} is not a field of {spec} in: {command}"
            node = node[part]
