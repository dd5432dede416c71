"""`--params` (issue 14 part 5; issues 16 and 17: img2img, hires and schedule fields): settings from an
A1111 infotext, ours or A1111's; flags win; fields this tool does not use are named (a warning, or an
error under --strict-params); a hires pass it cannot run as written is refused unless a flag replaces it."""

from __future__ import annotations

import numpy as np
import pytest
from micro_model import micro_argv
from PIL import Image

from sd_cli.cli import main
from sd_cli.errors import UsageError
from sd_cli.output.png import read_png_metadata
from sd_cli.run.params import settings_from_infotext

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A1111_TEXT = ("masterpiece, a castle\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
              "CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
              "Clip skip: 2, Denoising strength: 0.5, Hires upscale: 2, Version: v1.10.1")
# A1111 1.10's txt2img line with the hires fix (its field order), and its img2img line.
HIRES = ("a castle\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, "
         "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Hires upscale: 2, "
         "Hires steps: 10, Hires upscaler: Latent, Version: v1.10.1")
IMG2IMG = ("a castle\nSteps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 512x512, "
           "Model hash: 6ce0161689, Denoising strength: 0.45, Mask blur: 4, Version: v1.10.1")
BASE = {"prompt": "a castle", "negative_prompt": "", "steps": 20, "scale": 7.0, "seed": 1, "width": 512,
        "height": 768, "sampler": "dpmpp_2m", "scheduler": "karras", "n_samples": 1}


def _argv(micro, out, *extra):
    """micro_argv without its --ddim_steps 2 (the infotext's Steps and Sampler are to apply)."""
    return [a for a in micro_argv(micro, out, *extra) if a not in ("--ddim_steps", "2")]


def test_reads_a1111s_infotext_and_names_what_it_does_not_use():
    found, unused = settings_from_infotext(A1111_TEXT)
    assert found == {"prompt": "masterpiece, a castle", "negative_prompt": "blurry", "steps": 20, "scale": 7.0,
                     "seed": 1234, "width": 512, "height": 768, "sampler": "dpmpp_2m", "scheduler": "karras",
                     "clip_skip": 2, "n_samples": 1, "hr_scale": 2.0, "hr_strength": 0.5}
    assert unused == []
    assert settings_from_infotext(A1111_TEXT + ", ENSD: 31337, Hires sampler: Euler")[1] == ["ENSD", "Hires sampler"]


@pytest.mark.parametrize("fields, hires", [
    ("Denoising strength: 0.7, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent",
     {"hr_scale": 2.0, "hr_steps": 10, "hr_strength": 0.7, "hr_upscaler": "latent"}),
    ("Denoising strength: 0.55, Hires upscale: 1.5, Hires upscaler: Latent (nearest-exact)",
     {"hr_scale": 1.5, "hr_strength": 0.55, "hr_upscaler": "latent-nearest"}),
    ("Denoising strength: 0.4, Hires upscale: 2, Hires steps: 0, Hires upscaler: Lanczos",  # 0: the first pass's
     {"hr_scale": 2.0, "hr_strength": 0.4, "hr_upscaler": "lanczos"}),
    ("Denoising strength: 0.4, Hires upscale: 2, Hires upscaler: None",  # A1111's plain Lanczos resize
     {"hr_scale": 2.0, "hr_strength": 0.4, "hr_upscaler": "lanczos"}),
    ("Denoising strength: 0.7, Hires resize: 1024x1536, Hires upscaler: Latent",
     {"hr_scale": 2.0, "hr_strength": 0.7, "hr_upscaler": "latent"}),
    ("Denoising strength: 0.7, Hires resize: 0x1152, Hires upscaler: Latent",  # 0: kept in proportion
     {"hr_scale": 1.5, "hr_strength": 0.7, "hr_upscaler": "latent"}),
])
def test_a1111_hires_fields(fields, hires):
    text = ("a castle\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, "
            f"Model hash: 6ce0161689, {fields}, Version: v1.10.1")
    assert settings_from_infotext(text) == ({**BASE, **hires}, [])


def test_denoising_strength_is_img2imgs_strength_and_needs_the_hires_fix_in_txt2img():
    found, unused = settings_from_infotext(IMG2IMG, "img2img")
    assert (found["strength"], found["sampler"], unused) == (0.45, "euler_ancestral", ["Mask blur"])
    assert "scheduler" not in found  # Automatic: the sampler's default
    found, unused = settings_from_infotext(IMG2IMG)  # the same text for sd-txt2img: no hires pass to apply it to
    assert "strength" not in found and "hr_strength" not in found
    assert unused == ["Denoising strength (no hires fix): 0.45", "Mask blur"]
    found, unused = settings_from_infotext(HIRES, "img2img")  # a hires txt2img image into sd-img2img
    assert found["strength"] == 0.7 and "hr_scale" not in found
    assert unused == ["Hires upscale", "Hires steps", "Hires upscaler"]


def test_a_hires_pass_this_tool_cannot_run_is_refused_unless_a_flag_replaces_it():
    esrgan = HIRES.replace("Hires upscaler: Latent", "Hires upscaler: R-ESRGAN 4x+")
    with pytest.raises(UsageError, match=r"Hires upscaler 'R-ESRGAN 4x\+'.*--hr-upscaler"):
        settings_from_infotext(esrgan)
    found, unused = settings_from_infotext(esrgan, given={"hr_upscaler": "--hr-upscaler"})
    assert found["hr_scale"] == 2.0 and "hr_upscaler" not in found and unused == ["Hires upscaler: R-ESRGAN 4x+"]
    cropped = HIRES.replace("Hires upscale: 2", "Hires resize: 1024x1024")  # A1111 crops: not one factor
    with pytest.raises(UsageError, match="Hires resize 1024x1024.*--hr-scale"):
        settings_from_infotext(cropped)
    found, unused = settings_from_infotext(cropped, given={"hr_scale": "--hr-scale"})
    assert "hr_scale" not in found and found["hr_steps"] == 10 and unused == ["Hires resize: 1024x1024"]
    with pytest.raises(UsageError, match="Hires steps 'ten'"):
        settings_from_infotext(HIRES.replace("Hires steps: 10", "Hires steps: ten"))


def test_a1111_schedule_type_labels():
    euler = "x\nSteps: 20, Sampler: Euler a, Schedule type: {}, CFG scale: 7, Seed: 1, Size: 64x64"
    assert settings_from_infotext(euler.format("Automatic"))[0]["sampler"] == "euler_ancestral"
    assert "scheduler" not in settings_from_infotext(euler.format("Automatic"))[0]  # the sampler's default
    for label, ours in (("Uniform", "normal"), ("Normal", "normal"), ("Karras", "karras"),
                        ("Exponential", "exponential"), ("SGM Uniform", "sgm_uniform"), ("Simple", "simple"),
                        ("DDIM", "ddim_uniform")):
        assert settings_from_infotext(euler.format(label))[0]["scheduler"] == ours, label
    for label in ("Polyexponential", "KL Optimal", "Align Your Steps", "Beta"):  # A1111's Beta is not ours
        found, unused = settings_from_infotext(euler.format(label))
        assert "scheduler" not in found and unused[0].startswith(f"Schedule type: {label}"), label
    ours = euler.format("Beta") + ", Version: sd_cli 0.1.0"  # sd_cli writes its (ComfyUI's) beta as "Beta"
    assert settings_from_infotext(ours) == ({**settings_from_infotext(ours)[0], "scheduler": "beta"}, [])
    ddim = "x\nSteps: 20, Sampler: DDIM, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64"
    assert settings_from_infotext(ddim)[1] == ["Schedule type: Karras (DDIM runs on its own grid)"]


@pytest.mark.parametrize("label, sampler, scheduler", [
    ("DPM++ 2M Karras", "dpmpp_2m", None), ("DPM++ SDE Karras", "dpmpp_sde", "karras"),
    ("LMS Karras", "lms", "karras"), ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),
    ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde", "exponential"), ("Euler a", "euler_ancestral", None),
])
def test_older_sampler_names_carry_the_schedule(label, sampler, scheduler):
    found, unused = settings_from_infotext(f"x\nSteps: 20, Sampler: {label}, CFG scale: 7, Seed: 1, Size: 64x64")
    assert (found["sampler"], found.get("scheduler"), unused) == (sampler, scheduler, [])


def test_round_trip_regenerates_the_same_file(micro, tmp_path, capsys):
    first = tmp_path / "a"
    assert main([*micro_argv(micro, first, "--prompt", "a (red) cube, BREAK a ball", "--seed", "77",
                             "--scale", "4.5")]) == 0
    src = first / "samples" / "00000.png"
    again = tmp_path / "b"
    base = _argv(micro, again)
    assert main([*base, "--params", str(src)]) == 0
    assert (again / "samples" / "00000.png").read_bytes() == src.read_bytes()
    capsys.readouterr()
    # A flag on the command line wins over the infotext.
    assert main([*base, "--params", str(src), "--seed", "5", "--outdir", str(tmp_path / "c")]) == 0
    assert read_png_metadata(tmp_path / "c" / "samples" / "00000.png")[1]["seed"] == 5


def test_hires_round_trip_regenerates_the_same_file(micro, tmp_path, capsys):
    hires = ("--hr-scale", "2", "--hr-steps", "3", "--denoising-strength", "0.6", "--hr-upscaler", "latent-nearest")
    assert main(micro_argv(micro, tmp_path / "a", "--skip_grid", "--seed", "9", *hires)) == 0
    src = tmp_path / "a" / "samples" / "00000.png"
    assert "Hires upscale: 2.0, Hires steps: 3, Hires upscaler: Latent (nearest-exact)" in read_png_metadata(src)[0]
    assert main([*_argv(micro, tmp_path / "b", "--skip_grid"), "--params", str(src), "--strict-params"]) == 0
    assert (tmp_path / "b" / "samples" / "00000.png").read_bytes() == src.read_bytes()
    assert capsys.readouterr().err == ""
    # Flags win, one hires field at a time.
    assert main([*_argv(micro, tmp_path / "c", "--skip_grid"), "--params", str(src), "--denoising-strength", "0.3"]) == 0
    hr = read_png_metadata(tmp_path / "c" / "samples" / "00000.png")[1]["hires"]
    assert (hr["scale"], hr["steps"], hr["strength"], hr["upscaler"]) == (2.0, 3, 0.3, "latent-nearest")


def test_hires_upscaler_this_tool_lacks_on_the_command_line(micro, tmp_path, capsys):
    text = ("a cube\nSteps: 2, Sampler: Euler, CFG scale: 3, Seed: 1, Size: 64x64, Denoising strength: 0.5, "
            "Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+")
    argv = [*_argv(micro, tmp_path / "o", "--skip_grid"), "--params", text]
    assert main(argv) == 2
    assert "R-ESRGAN 4x+" in capsys.readouterr().err and not (tmp_path / "o" / "samples").exists()
    assert main([*argv, "--hr-upscaler", "lanczos"]) == 0
    assert "warning: --params: not used: Hires upscaler: R-ESRGAN 4x+" in capsys.readouterr().err
    meta = read_png_metadata(tmp_path / "o" / "samples" / "00000.png")[1]
    assert (meta["hires"]["upscaler"], meta["hires"]["strength"], meta["width"]) == ("lanczos", 0.5, 64)
    assert main([*argv, "--hr-upscaler", "lanczos", "--strict-params"]) == 2
    assert "Hires upscaler: R-ESRGAN 4x+ (--strict-params)" in capsys.readouterr().err


def test_img2img_round_trip_keeps_the_strength(micro, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(init)
    argv = micro_argv(micro, tmp_path / "a", "--skip_grid", "--init-img", str(init), "--strength", "0.6",
                      "--sampler", "euler", "--steps", "4")
    assert main([a for a in argv if a not in ("--ddim_steps", "2")], command="img2img") == 0
    src = tmp_path / "a" / "samples" / "00000.png"
    assert "Denoising strength: 0.6" in read_png_metadata(src)[0]
    again = [*_argv(micro, tmp_path / "b", "--skip_grid", "--init-img", str(init)), "--params", str(src)]
    assert main([*again, "--strict-params"], command="img2img") == 0
    out = tmp_path / "b" / "samples" / "00000.png"
    assert read_png_metadata(out)[1]["strength"] == 0.6 and out.read_bytes() == src.read_bytes()
    capsys.readouterr()
    assert main([*again, "--strength", "0.3", "--outdir", str(tmp_path / "c")], command="img2img") == 0
    assert read_png_metadata(tmp_path / "c" / "samples" / "00000.png")[1]["strength"] == 0.3


def test_unused_fields_warn_or_fail_under_strict(micro, tmp_path, capsys):
    text = "a cube\nSteps: 2, Sampler: DDIM, CFG scale: 3, Seed: 1, Size: 64x64, ENSD: 31337, Denoising strength: 0.4"
    argv = _argv(micro, tmp_path / "o")
    assert main([*argv, "--params", text]) == 0
    assert "warning: --params: not used: Denoising strength (no hires fix): 0.4, ENSD\n" in capsys.readouterr().err
    assert main([*argv, "--params", text, "--strict-params"]) == 2
    err = capsys.readouterr().err
    assert "ENSD" in err and "Denoising strength" in err
    assert main([*argv, "--params", "a cube\nSteps: many, Sampler: DDIM, Seed: 1"]) == 2
