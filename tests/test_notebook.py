"""``notebooks/sampling.ipynb`` runs headlessly, top to bottom, on a tiny random model,
and prints what the library computes for the same model and prompt.

The model path reaches the notebook through the environment (its parameters cell
reads ``NEOX_JAX_MODEL``), which the kernel inherits from this process. The checks
read the executed notebook's outputs and compare them with the same calls made here.
"""

from pathlib import Path

import jax
import nbformat
from helpers.generate import make_model_dir
from nbclient import NotebookClient

from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.inference import Generator, SamplingParams
from neox_jax.loading import find_tokenizer, load_model

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sampling.ipynb"
PROMPT, MAX_NEW = "naïve café", 12


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


def test_sampling_notebook_prints_what_the_library_computes(tmp_path, monkeypatch):
    model = tmp_path / "model"
    make_model_dir(model)
    monkeypatch.setenv("NEOX_JAX_MODEL", str(model))
    monkeypatch.setenv("NEOX_JAX_PROMPT", PROMPT)
    monkeypatch.setenv("NEOX_JAX_MAX_NEW_TOKENS", str(MAX_NEW))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=False).execute(
        cwd=str(tmp_path)
    )
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    # neox_jax is importable here, so the install cell ran nothing and printed nothing.
    assert code[0].get("outputs", []) == []
    printed = "\n".join(_stdout(c) for c in code).splitlines()

    # The same model, greedy and beam search, computed in this process.
    config, params = load_model(str(model))
    generator = Generator(config, params, load_tokenizer(find_tokenizer(str(model))))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    greedy = generator.generate(PROMPT, SamplingParams(max_new_tokens=MAX_NEW))[0]
    beams = SamplingParams(max_new_tokens=MAX_NEW, num_beams=3, length_penalty=1.0)
    beam = generator.generate(PROMPT, beams)[0]

    assert any(line.startswith(f"{n_params / 1e6:.1f}M parameters") for line in printed)
    # The greedy continuation (one line when it has no newline; the tiny model's
    # random text may, so compare the printed run of lines).
    assert "\n".join(printed).count(PROMPT + greedy.text) >= 1
    assert f"-- {greedy.finish_reason} {len(greedy.token_ids)} tokens" in printed
    assert f"[beam search, 3 beams] {beam.text!r} (score {beam.score:.3f})" in printed


def test_repository_url_is_declared_once_and_used_by_badge_and_install_cell():
    import configparser
    import re

    root = NOTEBOOK.parents[1]
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    url = cfg["metadata"]["url"]
    owner_repo = url.removeprefix("https://github.com/")
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    install = cells[1].source
    assert f'NEOX_JAX_REPO = "{url}"' in install
    # The base install only: sampling needs no torch, and Colab's own must not be replaced.
    assert 'f"neox_jax @ git+{NEOX_JAX_REPO}"' in install and "[hf]" not in install
    badge = f"colab.research.google.com/github/{owner_repo}/blob/main/notebooks/sampling.ipynb"
    assert badge in (root / "README.md").read_text() and badge in cells[0].source
    assert re.search(r'MODEL = .*"EleutherAI/pythia-160m"', cells[2].source)
