"""README commands that ``test_cli_behaviour.test_readme_command_lines_parse`` does not parse
(those written inline in the prose, and sweeps, whose runs get their flags later) name real
config fields: each ``--config.a.b=v``, and each sweep grid key, exists in the config of the
command's ``--config=configs/<file>.py[:arg]`` (a sweep's: its runs' flags and grid keys in
its ``--config.train_config=``, its own fields in configs/sweep.py), so a documented
override is never a typo that the locked config would reject at run time."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from helpers.docs import documentation

REPO = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = documentation()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    inline = [m.replace("\n", " ") for m in re.findall(r"`([^`]*python -m neox_jax[^`]*)`", prose)]
    sweeps = [line for line in lines if "python -m neox_jax.sweep" in line]
    specs = ("--config=configs/", "--config.train_config=configs/")
    return [c for c in inline + sweeps if "python -m neox_jax" in c and any(s in c for s in specs)]


def _config(spec: str):
    file, _, arg = spec.partition(":")
    module = importlib.util.spec_from_file_location(f"_readme_{Path(file).stem}", REPO / file)
    loaded = importlib.util.module_from_spec(module)
    module.loader.exec_module(loaded)
    return loaded.get_config(arg) if arg else loaded.get_config()


def _fields(command: str) -> list[tuple[str, list[str]]]:
    """(config spec, the fields the command sets in it) for each config it names."""
    args = shlex.split(command.split("#")[0])
    if "neox_jax.sweep" in args:
        own = args[: args.index("--")] if "--" in args else args
        runs = args[len(own) + 1 :]
        spec = next(a.split("=", 1)[1] for a in own if a.startswith("--config.train_config="))
        fields = _overrides(runs)
        for grid in (a.split("=", 1)[1] for a in own if a.startswith("--config.grid=")):
            fields += [axis.split("=", 1)[0].strip() for axis in grid.split(";") if axis.strip()]
        return [("configs/sweep.py", _overrides(own)), (spec, fields)]
    spec = next(a.split("=", 1)[1] for a in args if a.startswith("--config=configs/"))
    return [(spec, _overrides(args))]


def _overrides(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0].removeprefix("--config.") for a in args
            if a.startswith("--config.")]  # fmt: skip


COMMANDS = _commands()


def test_the_readme_documents_commands():
    assert len(COMMANDS) >= 2
    assert any("neox_jax.sweep" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=range(len(COMMANDS)))
def test_every_documented_override_is_a_field_of_its_config(command):
    for spec, fields in _fields(command):
        config = _config(spec)
        for field in fields:
            node = config
            for part in field.split("."):
                assert part in node, f"README: {field} is not a field of {spec} in: {command}"
                node = node[part]
