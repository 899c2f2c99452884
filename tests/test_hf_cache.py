"""The Hugging Face cache and Hub settings, as huggingface_hub itself sees them."""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cmw_vllm import hf_cache
from tests.conftest import REPO_ROOT


def _hub_says(code: str) -> str:
    """What huggingface_hub computes from this process's environment (read at its import)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    return out.stdout.strip()


def test_cache_location_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache.hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hf_cache.hub_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_cache.hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


def test_cache_location_matches_huggingface_hub(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    code = "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"
    assert Path(_hub_says(code)) == hf_cache.hub_cache_dir()


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", "on", "0", "false", "no",
                                   "off", "maybe", " 1", "1 ", "2"])
def test_offline_is_parsed_as_huggingface_hub_parses_it(value: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    hub = _hub_says("from huggingface_hub import constants; print(constants.HF_HUB_OFFLINE)")
    assert hf_cache.offline() is (hub == "True")


def test_offline_falls_back_to_transformers_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not hf_cache.offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hf_cache.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hf_cache.offline()


def test_token_from_variable_then_saved_file(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    assert hf_cache.token() is None and hf_cache.token_source() is None
    saved = Path(os.environ["HF_HOME"]) / "token"
    saved.parent.mkdir(parents=True)
    saved.write_text("hf_saved\n")
    assert (hf_cache.token(), hf_cache.token_source()) == ("hf_saved", str(saved))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "other-token"))
    assert hf_cache.token() is None
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_legacy")
    assert (hf_cache.token(), hf_cache.token_source()) == ("hf_legacy", "HUGGING_FACE_HUB_TOKEN")
    monkeypatch.setenv("HF_TOKEN", " hf_env ")
    assert (hf_cache.token(), hf_cache.token_source()) == ("hf_env", "HF_TOKEN")


def test_repo_folder_names_round_trip() -> None:
    assert hf_cache.repo_folder_name("org/name") == "models--org--name"
    assert hf_cache.repo_id_of_folder("models--org--name") == "org/name"
    assert hf_cache.repo_id_of_folder("models--gpt2") == "gpt2"
    assert hf_cache.repo_id_of_folder("datasets--org--data") is None
    assert hf_cache.repo_id_of_folder("models--a--b--c") is None


def _snapshot(repo_id: str, commit: str, files: dict[str, str], ref: str | None = None) -> Path:
    folder = hf_cache.repo_dir(repo_id)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snap


def test_snapshot_dir_follows_refs_and_falls_back_to_the_newest() -> None:
    main_commit, other = "a" * 40, "b" * 40
    main_snap = _snapshot("org/m", main_commit, {"config.json": "{}"}, ref="main")
    other_snap = _snapshot("org/m", other, {"config.json": "{}", "x": ""}, ref="dev")
    assert hf_cache.snapshot_dir("org/m") == main_snap
    assert hf_cache.snapshot_dir("org/m", "dev") == other_snap
    assert hf_cache.snapshot_dir("org/m", other) == other_snap
    assert hf_cache.snapshot_dir("org/m", "nope") is None
    assert hf_cache.snapshot_dir("org/m", needs="x") == other_snap  # main lacks it
    assert hf_cache.snapshot_dir("org/m", "main", needs="x") is None
    assert hf_cache.snapshot_dir("org/absent") is None
    assert hf_cache.is_cached("org/m") and not hf_cache.is_cached("org/absent")
    assert hf_cache.snapshot_of_path(other_snap) == ("org/m", other, hf_cache.hub_cache_dir())
    assert hf_cache.snapshot_of_path(other_snap.parent) is None


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> Path:
    """A safetensors file with these (dtype, shape, data bytes) tensors, zero-filled."""
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def test_one_safetensors_reader_for_verify_and_estimate(tmp_path: Path) -> None:
    from cmw_vllm.model_spec import spec_from_dir
    from cmw_vllm.model_verifier import safetensors_problem

    # fp4 packs two elements a byte: 8 elements are 4 bytes, not 8.
    good = _safetensors(tmp_path / "good.safetensors",
                        {"w": ("F4", [4, 2], 4), "b": ("BF16", [3], 6)})
    length, header = hf_cache.read_safetensors_header(good)
    assert header["w"]["dtype"] == "F4" and length > 0
    assert safetensors_problem(good, good.stat().st_size) == (None, {"w", "b"})
    bad = _safetensors(tmp_path / "bad.safetensors", {"w": ("F4", [4, 2], 8)})
    text, _names = safetensors_problem(bad, bad.stat().st_size)
    assert text is not None and "needs 4 bytes, header gives 8" in text
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        hf_cache.read_safetensors_header(tmp_path / "short.safetensors")

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100}))
    good.rename(model / "model.safetensors")
    assert spec_from_dir(model).params_by_dtype == {"F4": 8, "BF16": 3}


def _package_imports(module: str) -> set[str]:
    tree = ast.parse((REPO_ROOT / "cmw_vllm" / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cmw_vllm"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n.split(".")[1] for n in names if n.startswith("cmw_vllm.")}


def test_hf_cache_imports_nothing_of_the_package_and_verify_not_download() -> None:
    assert _package_imports("hf_cache") == set()
    assert "model_downloader" not in _package_imports("model_verifier")
    assert "model_verifier" in _package_imports("model_downloader")


def test_reading_the_cache_imports_no_huggingface_hub() -> None:
    code = ("import sys, cmw_vllm.hf_cache as c; c.hub_cache_dir(); c.is_cached('a/b'); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('huggingface'))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout) == []
