"""`--params` (issue 14 part 5): settings from an A1111 infotext, ours or A1111's; flags win; fields
this tool does not use are named (a warning, or an error under --strict-params)."""

from __future__ import annotations

import pytest
from micro_model import micro_argv

from sd_cli.cli import main
from sd_cli.output.png import read_png_metadata
from sd_cli.run.params import settings_from_infotext

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A1111_TEXT = ("masterpiece, a castle\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
              "CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
              "Clip skip: 2, Denoising strength: 0.5, Hires upscale: 2, Version: v1.10.1")


def test_reads_a1111s_infotext_and_names_what_it_does_not_use():
    found, unused = settings_from_infotext(A1111_TEXT)
    assert found == {"prompt": "masterpiece, a castle", "negative_prompt": "blurry", "steps": 20, "scale": 7.0,
                     "seed": 1234, "width": 512, "height": 768, "sampler": "dpmpp_2m", "scheduler": "karras",
                     "clip_skip": 2, "n_samples": 1}
    assert unused == ["Denoising strength", "Hires upscale"]


def test_a1111_schedule_type_labels():
    euler = "x\nSteps: 20, Sampler: Euler a, Schedule type: {}, CFG scale: 7, Seed: 1, Size: 64x64"
    assert settings_from_infotext(euler.format("Automatic"))[0]["sampler"] == "euler_ancestral"
    assert "scheduler" not in settings_from_infotext(euler.format("Automatic"))[0]  # the sampler's default
    assert settings_from_infotext(euler.format("Uniform"))[0]["scheduler"] == "normal"
    assert settings_from_infotext(euler.format("Exponential"))[0]["scheduler"] == "exponential"


def test_round_trip_regenerates_the_same_file(micro, tmp_path, capsys):
    first = tmp_path / "a"
    assert main([*micro_argv(micro, first, "--prompt", "a (red) cube, BREAK a ball", "--seed", "77",
                             "--scale", "4.5")]) == 0
    src = first / "samples" / "00000.png"
    again = tmp_path / "b"
    base = [a for a in micro_argv(micro, again) if a not in ("--ddim_steps", "2")]
    assert main([*base, "--params", str(src)]) == 0
    assert (again / "samples" / "00000.png").read_bytes() == src.read_bytes()
    capsys.readouterr()
    # A flag on the command line wins over the infotext.
    assert main([*base, "--params", str(src), "--seed", "5", "--outdir", str(tmp_path / "c")]) == 0
    assert read_png_metadata(tmp_path / "c" / "samples" / "00000.png")[1]["seed"] == 5


def test_unused_fields_warn_or_fail_under_strict(micro, tmp_path, capsys):
    text = "a cube\nSteps: 2, Sampler: DDIM, CFG scale: 3, Seed: 1, Size: 64x64, ENSD: 31337"
    argv = [a for a in micro_argv(micro, tmp_path / "o") if a not in ("--ddim_steps", "2")]
    assert main([*argv, "--params", text]) == 0
    assert "warning: --params: not used: ENSD" in capsys.readouterr().err
    assert main([*argv, "--params", text, "--strict-params"]) == 2
    assert "ENSD" in capsys.readouterr().err
    assert main([*argv, "--params", "a cube\nSteps: many, Sampler: DDIM, Seed: 1"]) == 2
