"""The Python API (issue 12): `sd_cli.StableDiffusion` is the CLI's own engine, so its images equal the
CLI's files pixel for pixel and carry the same metadata, for the demo model and for a checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from micro_model import micro_argv
from PIL import Image

import sd_cli
from sd_cli.cli import main
from sd_cli.demo import demo_available
from sd_cli.output.png import read_png_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")
README = Path(__file__).resolve().parent.parent / "README.md"


def _cli_file(argv: list[str], outdir: Path, capsys) -> Path:
    assert main([*argv, "--outdir", str(outdir), "--n_iter", "1", "--skip_grid", "--threads", "1"]) == 0
    capsys.readouterr()
    return outdir / "samples" / "00000.png"


def _same_as_file(img, path: Path) -> None:
    text, meta = read_png_metadata(path)
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(img), np.asarray(im.convert("RGB")))
    assert img.info["parameters"] == text
    assert json.loads(img.info["sd_cli"]) == meta


@pytest.mark.skipif(not demo_available(), reason="the demo model is not shipped in this checkout")
def test_demo_model_images_equal_the_cli_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing at models/ldm/...: the demo model is the default for both
    sd = sd_cli.StableDiffusion.load(threads=1)
    images = sd.txt2img("a red circle on a blue background", seed=7, n=2)
    assert len(images) == 2 and all(im.size == (64, 64) for im in images)  # the demo's size and guidance 3
    assert json.loads(images[0].info["sd_cli"])["scale"] == 3.0
    path = _cli_file(["--prompt", "a red circle on a blue background", "--seed", "7", "--n_samples", "2"],
                     tmp_path / "cli", capsys)
    _same_as_file(images[0], path)
    _same_as_file(images[1], path.with_name("00001.png"))
    assert not (tmp_path / "outputs").exists()  # the API wrote nothing by itself


def test_checkpoint_image_equals_the_cli_file_and_saves_with_its_metadata(micro, tmp_path, capsys):
    sd = sd_cli.StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), threads=1)
    [img] = sd.txt2img("a lighthouse", seed=3, n=1, height=64, width=64, sampler="ddim", steps=2, watermark=False)
    argv = [a for a in micro_argv(micro, tmp_path / "x") if a not in ("--outdir", str(tmp_path / "x"))]
    path = _cli_file([*argv, "--prompt", "a lighthouse", "--seed", "3"], tmp_path / "cli", capsys)
    _same_as_file(img, path)

    img.save(tmp_path / "saved.png")  # plain PIL save keeps both text chunks ...
    assert read_png_metadata(tmp_path / "saved.png") == read_png_metadata(path)
    rc = main(["--replay", str(tmp_path / "saved.png"), "--ckpt", str(micro["safetensors"]), "--config",
               str(micro["config"]), "-q"])
    assert rc == 0 and capsys.readouterr().out.startswith("identical")  # ... so the file replays
    [written] = sd_cli.save_images([img], tmp_path / "own")  # the CLI's writer: the CLI's bytes
    assert written.read_bytes() == path.read_bytes()


def test_settings_are_frozen_and_checked_once():
    from dataclasses import FrozenInstanceError

    from sd_cli.errors import UsageError
    from sd_cli.run.settings import Generation

    gen = Generation.create(["x"], steps=10)
    assert (gen.sampler, gen.steps, gen.scale, gen.height) == ("dpmpp_2m", 10, 7.5, 512)
    with pytest.raises(FrozenInstanceError):
        gen.steps = 20  # type: ignore[misc]
    for bad in ({"height": 60}, {"seed": -1}, {"steps": 0}, {"scale": float("nan")}, {"n_samples": 0}):
        with pytest.raises(UsageError):
            Generation.create(["x"], **bad)
    assert Generation.create(["x"], sampler="euler_a").eta == 1.0  # the sampler's own eta, resolved once


@pytest.mark.skipif(not demo_available(), reason="the demo model is not shipped in this checkout")
def test_readme_api_example_runs(tmp_path, monkeypatch):
    """The README's "Python API" example, run as it is written there."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README has no api-example block"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(m.group(1), "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert len(scope["images"]) == 2 and all(p.is_file() for p in scope["paths"])
    assert (tmp_path / "one.png").is_file() and read_png_metadata(tmp_path / "one.png")[1]["seed"] == 42
