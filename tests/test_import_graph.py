"""The package has no import circles, counting imports inside functions too.

A circle dodged by an import inside a function is still a circle (it hides a layer in
the wrong place). The graph has an edge from a module to every ``neox_jax`` module it
imports anywhere in its source, and, because Python runs a package's ``__init__`` before
any of its submodules, to the ``__init__.py`` of every package it imports from (unless
the importer sits inside that package: a package may re-export its own submodules).
"""

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "neox_jax"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every dotted module name an ``import`` or ``from ... import`` in ``tree`` may load."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importer's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # may be submodules
    return {n for n in names if n == "neox_jax" or n.startswith("neox_jax.")}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: the neox_jax modules it makes Python load}`` for every file under root."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for name in _imported_names(ast.parse(path.read_text(), str(path)), package):
            # The longest existing module the name starts with, plus the packages above it.
            while name and name not in files:
                name = name.rpartition(".")[0]
            targets = [name]
            parent = name.rpartition(".")[0]
            while parent:
                targets.append(parent)
                parent = parent.rpartition(".")[0]
            for target in targets:
                # A module inside a package does not count its own package's __init__.
                if target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (a list of modules), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return e.args[1]
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_package_has_no_import_circles():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # it saw the code
    circle = find_circle(graph)
    assert circle is None, "an import circle (imports inside functions count): " + " -> ".join(
        circle
    )


# The LoRA format modules the loader reads; nothing else of finetune/ is below training.
FORMATS = {"neox_jax.finetune", "neox_jax.finetune.lora", "neox_jax.finetune.peft_format"}


def test_training_never_imports_finetune():
    graph = import_graph()
    training = [m for m in graph if m.startswith("neox_jax.training")]
    direct = {t for m in training for t in graph[m] if t.startswith("neox_jax.finetune")}
    assert not direct, f"training imports {direct}: hand fine-tuning in through TrainerHooks"
    reach = set().union(*(reachable(graph, m) for m in training))
    assert not {m for m in reach if m.startswith("neox_jax.finetune")} - FORMATS


@pytest.mark.parametrize(
    "source,circle",
    [
        ({"a.py": "import neox_jax.b", "b.py": "def f():\n    from neox_jax import a\n"}, True),
        ({"a.py": "import neox_jax.b", "b.py": "import json\n"}, False),
        # b imports the package p, whose __init__ imports a: a circle through __init__.
        (
            {
                "a.py": "from neox_jax.p import b",
                "p/__init__.py": "import neox_jax.a",
                "p/b.py": "",
            },
            True,
        ),
        # A package re-exporting its own submodule is not a circle.
        (
            {
                "p/__init__.py": "from neox_jax.p.b import x",
                "p/b.py": "from neox_jax.p import c",
                "p/c.py": "",
            },
            False,
        ),
    ],
)
def test_the_graph_sees_function_level_and_package_imports(tmp_path, source, circle):
    root = tmp_path / "neox_jax"
    for name, text in {"__init__.py": "", **source}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert (find_circle(import_graph(root)) is not None) == circle


# Every entry point (``python -m ...``; ``--help`` imports what importing does), and the
# heavy libraries none of them needs to start: torch alone costs 2-4 s per command. Each
# is imported where it is used (tensorboardX when a TensorBoard writer is made, without
# torch; transformers and torch when a .bin file is read; the server's fastapi
# when it serves).
ENTRY_POINTS = (
    "neox_jax.train", "neox_jax.sample", "neox_jax.serve", "neox_jax.evaluate",
    "neox_jax.convert.__main__", "neox_jax.quantize", "neox_jax.embed", "neox_jax.rag",
    "neox_jax.sweep", "neox_jax.batch_viewer", "neox_jax.aot", "neox_jax.neox_config",
    "neox_jax.finetune.export", "neox_jax.data.preprocess", "neox_jax.data.spm_training",
    "neox_jax.retrieval.rag", "neox_jax.loading",
)  # fmt: skip
HEAVY = (
    "torch", "tensorflow", "transformers", "tensorflow_datasets", "datasets", "lm_eval",
    "faiss", "fastapi", "uvicorn", "tensorboardX",
)  # fmt: skip
_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(" ".join(h for h in {heavy!r} if h in sys.modules))
"""


def heavy_imports(*modules: str) -> set[str]:
    """The ``HEAVY`` libraries a fresh interpreter has loaded after importing ``modules``."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), *modules],
        capture_output=True, text=True, cwd=PACKAGE.parent, check=True,
    )  # fmt: skip
    return set(out.stdout.split())


def test_entry_points_start_without_heavy_libraries():
    # One interpreter for all (each start costs seconds); on failure, name the culprit.
    if found := heavy_imports(*ENTRY_POINTS):
        culprits = {m: heavy_imports(m) for m in ENTRY_POINTS}
        culprits = {m: sorted(h) for m, h in culprits.items() if h}
        raise AssertionError(f"importing the entry points loads {sorted(found)}: {culprits}")


def test_the_probe_sees_a_heavy_import():
    assert heavy_imports("tensorboardX") >= {"tensorboardX"}


_WRITER = """
import sys, tempfile, pathlib
from neox_jax.training.metrics import _tensorboard_writer
folder = pathlib.Path(tempfile.mkdtemp())
writer = _tensorboard_writer(folder)
writer.add_scalar("train/loss", 2.5, 7)
writer.close()
loaded = "torch" in sys.modules
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.event_file_writer import EventFileWriter  # noqa: F401
import struct
data = next(folder.iterdir()).read_bytes()
values = []
while data:  # TFRecord framing: length (8 bytes), its CRC (4), the record, its CRC (4)
    (n,) = struct.unpack("<Q", data[:8])
    event = Event.FromString(data[12 : 12 + n])
    values += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    data = data[16 + n :]
import torch  # the writer's import left torch importable
print(loaded, values, torch.__name__)
"""


def test_tensorboard_writer_starts_without_torch_and_leaves_it_importable():
    # tensorboardX imports torch (2-4 s) only to accept torch tensors; the trainer's writer
    # takes floats, so it loads tensorboardX with torch hidden (metrics.py says how).
    out = subprocess.run(
        [sys.executable, "-c", _WRITER], capture_output=True, text=True,
        cwd=PACKAGE.parent, check=True,
    )  # fmt: skip
    assert out.stdout.split("\n")[0] == "False [(7, 'train/loss', 2.5)] torch"
