"""The colabs/ notebooks run top to bottom (nbclient, a real ipykernel) with tiny settings injected after their
`parameters` cell, papermill-style; and they are committed without outputs."""
import os
import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"


def _execute(name: str, parameters: dict, monkeypatch) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    notebook = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(index + 1, injected)
    # The kernel inherits this environment: one CPU device and quick compiles (tiny models; conftest.py).
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f)
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(COLABS)}})
    client.execute()
    return notebook


def _text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") or "".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def _images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def test_quickstart(tmp_path, monkeypatch):
    notebook = _execute("quickstart", {"CONFIG": "configs/demo.py:smoke", "WORKDIR": str(tmp_path / "run"),
                                       "NUM_SCENES": 2}, monkeypatch)
    text = _text(notebook)
    assert "t2i_r1" in text and "top1_micro" in text  # the tables
    assert "training checkpoint step 4: top-1 correct on" in text
    assert _images(notebook) == 4  # curves, labelled scenes, similarity maps, label map
    assert re.search(r"segment\(\) on 8 held-out scenes: mIoU 0\.\d{3}", text)
    assert (tmp_path / "run" / "params" / "model.json").exists()


def test_load_checkpoint(tmp_path, monkeypatch):
    notebook = _execute("load_checkpoint", {"SCRATCH": str(tmp_path)}, monkeypatch)
    text = _text(notebook)
    assert "training checkpoint step 4" in text and "ground truth:" in text and " | " in text
    assert _images(notebook) == 2  # labelled image, retrieval grid
    assert len(list((tmp_path / "folder").glob("*.jpg"))) == 12


def test_import_pretrained(tmp_path, monkeypatch):
    notebook = _execute("import_pretrained", {"SCRATCH": str(tmp_path), "FINETUNE_STEPS": 2, "EVAL_IMAGES": 3},
                        monkeypatch)
    text = _text(notebook)
    assert "RANDOM weights" in text and "wrote params checkpoint" in text
    assert "zero-shot:" in text and "fine-tuned" in text
    assert "fine-tuning test-tiny for 2 steps" in text
    assert (tmp_path / "finetune" / "params" / "model.json").exists()
    assert "eva02_clip family" in text and "siglip family" in text  # the other families' conversion cell
    assert (tmp_path / "siglip" / "spiece.model").exists()  # the tokenizer travelled into the converted checkpoint


@pytest.mark.parametrize("name", ["quickstart", "load_checkpoint", "import_pretrained"])
def test_committed_without_outputs(name):
    notebook = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs before committing"
    assert sum("parameters" in c.metadata.get("tags", []) for c in notebook.cells) == 1
