"""Textual-inversion embeddings (issue 14, part 3): three file formats, loaded without running code, the
vectors standing in for the trigger word, metadata and replay, and bad files as one clear error."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sd_cli.cli import main
from sd_cli.errors import CheckpointError, UnsafeCheckpointError
from sd_cli.model.tokenizer import BOS, EOS, get_tokenizer
from sd_cli.output.png import read_png_metadata
from sd_cli.weights.embeddings import EmbeddingSet, load_embedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WIDTH = 32  # the tiny model's text width


def _vectors(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, WIDTH), generator=torch.Generator().manual_seed(seed))


def _write_all(folder, vec):
    folder.mkdir(exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vec.clone())},
                "name": "a1111", "step": 100}, folder / "a1111style.pt")
    save_file({"emb_params": vec.clone()}, str(folder / "stsstyle.safetensors"))
    torch.save({"<diffstyle>": vec.clone()}, folder / "diffstyle.bin")
    return folder


def test_three_formats_load_the_same_vectors(tmp_path):
    vec = _vectors()
    d = _write_all(tmp_path / "emb", vec)
    for name in ("a1111style.pt", "stsstyle.safetensors", "diffstyle.bin"):
        emb = load_embedding(d / name, WIDTH)
        assert torch.equal(emb.vectors, vec) and len(emb.hash) == 12


def test_wrong_width_sdxl_and_unsafe_files_are_clear_errors(tmp_path):
    save_file({"emb_params": torch.zeros(1, 768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match=r"wide.safetensors: vectors of shape \(1, 768\); this model needs"):
        load_embedding(tmp_path / "wide.safetensors", WIDTH)
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="SDXL"):
        load_embedding(tmp_path / "xl.safetensors", WIDTH)

    class Evil:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    torch.save({"string_to_param": {"*": Evil()}}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(UnsafeCheckpointError):
        load_embedding(tmp_path / "evil.pt", WIDTH)
    assert not (tmp_path / "PWNED").exists()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.binary(max_size=400))
def test_fuzz_garbage_embedding_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fz") / "junk.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        load_embedding(path, WIDTH)


@pytest.fixture(scope="module")
def tiny_model(tiny_files):
    from sd_cli.weights.config import load_config
    from sd_cli.weights.loading import load_model

    cfg = load_config(tiny_files["config"])
    return load_model(cfg.model, tiny_files["safetensors"], device="cpu", dtype=torch.float32)


def test_conditioning_equals_a_vocabulary_with_the_vectors_in_it(tiny_model, tmp_path):
    """Reference: write the two vectors into two spare rows of the token-embedding table and spell the
    trigger with those ids; the model's own forward pass on those ids must give our context."""
    from sd_cli.pipeline.conditioning import chunk_prompt, encode_chunked

    vec = _vectors()
    d = _write_all(tmp_path / "emb", vec)
    tok = get_tokenizer()
    emb_set = EmbeddingSet(d, tok, WIDTH)
    prompt = "a house, stsstyle, at night"
    chunked = chunk_prompt(prompt, tok, emb_set)
    assert chunked.embeddings == {"stsstyle": load_embedding(d / "stsstyle.safetensors", WIDTH).hash}
    with torch.inference_mode():
        ours = encode_chunked(lambda ids, fixes: tiny_model.encode_text(ids, 1, fixes), [chunked], "cpu")
        table = tiny_model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight
        saved = table[[100, 101]].clone()
        table[[100, 101]] = vec
        try:
            ids = [BOS, *tok.encode("a house,"), 100, 101, *tok.encode(", at night")]
            ids += [EOS] * (77 - len(ids))
            ref = tiny_model.encode_text(torch.tensor([ids]))
        finally:
            table[[100, 101]] = saved
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_cli_records_ti_hashes_and_replays_with_the_folder(tiny_files, tmp_path, capsys):
    d = _write_all(tmp_path / "emb", _vectors())
    base = ["--ckpt", str(tiny_files["safetensors"]), "--config", str(tiny_files["config"]), "--H", "64", "--W", "64",
            "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--no-watermark", "-q",
            "--threads", "1"]
    assert main([*base, "--prompt", "a cat, a1111style", "--negative-prompt", "diffstyle", "--embeddings", str(d),
                 "--outdir", str(tmp_path / "out")]) == 0
    image = tmp_path / "out" / "samples" / "00000.png"
    text, meta = read_png_metadata(image)
    assert set(meta["embeddings"]) == {"a1111style", "diffstyle"} and "TI hashes: " in text
    assert main([*base, "--prompt", "a cat, a1111style", "--negative-prompt", "diffstyle",
                 "--outdir", str(tmp_path / "without")]) == 0  # no folder: the words are only words
    with_px, without_px = (read_png_metadata(p) for p in (image, tmp_path / "without/samples/00000.png"))
    assert "embeddings" not in without_px[1]
    capsys.readouterr()
    replay = ["--replay", str(image), "--ckpt", str(tiny_files["safetensors"]), "--config", str(tiny_files["config"]),
              "-q"]
    assert main([*replay, "--embeddings", str(d)]) == 0 and capsys.readouterr().out.startswith("identical")
    assert main(replay) == 1 and "was made with the embedding(s) a1111style, diffstyle" in capsys.readouterr().err


def test_a_bad_embedding_in_the_prompt_is_one_line(tiny_files, tmp_path, capsys):
    d = tmp_path / "emb"
    d.mkdir()
    save_file({"emb_params": torch.zeros(1, 768)}, str(d / "wide.safetensors"))
    argv = ["--ckpt", str(tiny_files["safetensors"]), "--config", str(tiny_files["config"]), "--H", "64", "--W", "64",
            "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--prompt", "wide", "--embeddings", str(d),
            "--outdir", str(tmp_path / "out"), "-q", "--json"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "wide.safetensors: vectors of shape" in captured.err
    assert json.loads(captured.out)["ok"] is False
