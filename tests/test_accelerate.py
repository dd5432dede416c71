"""Faster sampling wired into the tool (issue 18): --deepcache N / --deepcache-branch B (model/deepcache.py),
--cfg-interval LO HI (guidance only while LO <= sigma <= HI), --tome RATIO (model/tome.py) and the --fast
preset, on the micro model (tests/micro_model.py) and the demo model: off is the computation as before,
each option changes the image and replays, the UNet calls are the ones the options say (counted with a
hook), the metadata, the A1111 text, --resume, --params and eval_demo know them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from micro_model import micro_argv
from sd_cli.cli import main
from sd_cli.cli.parser import build_parser
from sd_cli.errors import UsageError
from sd_cli.run.settings import FAST_PRESET, Generation

pytestmark = pytest.mark.usefixtures("one_torch_thread")
INF = math.inf


def _argv(micro, out, *extra):
    """Micro-model arguments with 8 Euler steps (DeepCache needs a few steps to skip any)."""
    argv = micro_argv(micro, out, "--skip_grid", "--sampler", "euler", "--steps", "8", *extra)
    i = argv.index("--ddim_steps")
    return argv[:i] + argv[i + 2:]


def _image(out):
    path = out / "samples" / "00000.png"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), json.loads(im.info["sd_cli"]), im.info["parameters"], path


def _replay(micro, path) -> int:
    return main(["--replay", str(path), "--ckpt", str(micro["safetensors"]), "--config", str(micro["config"]), "-q"])


@pytest.fixture(scope="module")
def plain(micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    assert main(_argv(micro, out)) == 0
    return _image(out)


class Calls:
    """Every UNet call of a model: batch rows, timestep, whether the whole UNet ran (its middle block),
    and the latent size. Counted at `prepare`, where plain, full and shallow calls all start."""

    def __init__(self, unet):
        self.log: list[dict] = []
        prepare = unet.prepare

        def counted(x, t, context):
            self.log.append({"rows": x.shape[0], "t": float(t[0]), "full": False, "size": x.shape[-1]})
            return prepare(x, t, context)

        self.unet, unet.prepare = unet, counted
        self.handle = unet.middle_block.register_forward_hook(lambda m, a, o: self.log[-1].update(full=True))

    def close(self):
        del self.unet.prepare
        self.handle.remove()


@pytest.fixture(scope="module")
def pipe(micro):
    from sd_cli import StableDiffusion

    return StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), dtype="fp32", threads=1).pipeline()


@pytest.fixture
def calls(pipe):
    c = Calls(pipe.model.model.diffusion_model)
    yield c
    c.close()


def _latents(pipe, seed=3, **kw):
    from sd_cli.pipeline.generate import initial_noise

    g = torch.Generator().manual_seed(seed)
    return pipe.latents(["a red circle"], initial_noise(g, 1, 4, 64, 64, 8), generator=g, prompt_syntax="a1111",
                        **kw)


# --- off is the computation as before; each option is exact where it should be ---------------------


def test_off_writes_no_new_fields(plain):
    _, meta, text, _ = plain
    for key in ("deepcache", "deepcache_branch", "cfg_interval", "tome"):
        assert key not in meta
    for label in ("DeepCache", "CFG interval", "Token merging"):
        assert label not in text


@pytest.mark.parametrize("flags", [("--deepcache", "1"), ("--cfg-interval", "0", "inf"), ("--tome", "0"),
                                   ("--cfg-interval", "0", "1000")])
def test_neutral_values_are_the_full_computation_bit_for_bit(micro, tmp_path, plain, flags):
    """deepcache 1, an interval holding every sigma and ratio 0: the same pixels as without the option."""
    assert main(_argv(micro, tmp_path / "o", *flags)) == 0
    assert np.array_equal(_image(tmp_path / "o")[0], plain[0])


def test_the_plain_unet_is_called_when_everything_is_off(pipe, calls):
    """No wrapper, no patch: the option-off path is the one images were made with before."""
    _latents(pipe, sampler="euler", steps=4, scale=5.0)
    assert [c["rows"] for c in calls.log] == [2] * 4 and all(c["full"] for c in calls.log)
    blocks = [m for m in pipe.model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and not any("forward" in b.attn1.__dict__ or b._forward_pre_hooks for b in blocks)


# --- each option changes the image and --replay makes it again ---------------------------------------


@pytest.mark.parametrize("flags, fields", [
    (("--deepcache", "2"), {"deepcache": 2, "deepcache_branch": 0}),
    (("--deepcache", "3", "--deepcache-branch", "1"), {"deepcache": 3, "deepcache_branch": 1}),
    (("--cfg-interval", "0.5", "5"), {"cfg_interval": [0.5, 5.0]}),
    (("--cfg-interval", "1", "inf"), {"cfg_interval": [1.0, None]}),
    (("--tome", "0.5"), {"tome": 0.5}),
    (("--fast",), {"deepcache": 3, "deepcache_branch": 0, "cfg_interval": list(FAST_PRESET["cfg_interval"])}),
])
def test_each_option_changes_the_image_is_recorded_and_replays(micro, tmp_path, plain, flags, fields):
    assert main(_argv(micro, tmp_path / "o", *flags)) == 0
    img, meta, text, path = _image(tmp_path / "o")
    assert not np.array_equal(img, plain[0])
    assert {k: meta.get(k) for k in fields} == fields
    line = text.splitlines()[-1]
    if "deepcache" in fields:
        assert f"DeepCache: {fields['deepcache']}, DeepCache branch: {fields['deepcache_branch']}" in line
    if "cfg_interval" in fields:
        lo, hi = fields["cfg_interval"]
        assert f"CFG interval: {lo!r}-{'inf' if hi is None else repr(hi)}" in line
    if "tome" in fields:
        assert "Token merging ratio: 0.5" in line and "Token merging ratio hr" not in line
    assert _replay(micro, path) == 0


def test_hires_with_token_merging_writes_the_hr_ratio_too(micro, tmp_path):
    assert main(_argv(micro, tmp_path / "o", "--tome", "0.3", "--hr-scale", "2", "--hr-steps", "2")) == 0
    _, meta, text, path = _image(tmp_path / "o")
    assert "Token merging ratio: 0.3, Token merging ratio hr: 0.3" in text
    assert _replay(micro, path) == 0


# --- --fast and the flags ---------------------------------------------------------------------------


def _settings(*argv, command="txt2img"):
    from sd_cli.cli import given_options, settings

    args = build_parser(command).parse_args(list(argv))
    return settings(args, given_options(list(argv), command) if args.params is not None else None)[0]


def test_fast_is_the_preset_and_given_options_win():
    gen = _settings("--fast")
    assert (gen.deepcache, gen.deepcache_branch, gen.cfg_interval, gen.tome) == (
        FAST_PRESET["deepcache"], FAST_PRESET["deepcache_branch"], FAST_PRESET["cfg_interval"], 0.0)
    gen = _settings("--fast", "--deepcache", "2", "--cfg-interval", "0.1", "inf", "--tome", "0.25")
    assert (gen.deepcache, gen.cfg_interval, gen.tome) == (2, (0.1, INF), 0.25)
    assert _settings("--fast", "--deepcache", "1").deepcache == 1  # DeepCache off, the interval stays
    assert _settings("--fast", "--scale", "1").cfg_interval is None  # no guidance: no interval
    off = _settings()
    assert (off.deepcache, off.deepcache_branch, off.cfg_interval, off.tome) == (1, 0, None, 0.0)


def test_fast_in_the_help_is_the_preset():
    from sd_cli.run.settings import fast_preset_text

    text = build_parser().format_help()
    assert "--fast" in text and fast_preset_text() in " ".join(text.split())
    assert fast_preset_text().startswith(f"--deepcache {FAST_PRESET['deepcache']}")


@pytest.mark.parametrize("flags, message", [
    (("--deepcache", "0"), "--deepcache 0: must be a whole number from 1"),
    (("--deepcache", "51"), "--deepcache 51"),
    (("--deepcache-branch", "1"), "only with --deepcache N"),
    (("--deepcache", "2", "--deepcache-branch", "12"), "--deepcache-branch 12"),
    (("--deepcache", "2", "--deepcache-branch", "6"), "this model's UNet has 6 input blocks (0..5)"),
    (("--cfg-interval", "3", "1"), "0 <= LO < HI"),
    (("--cfg-interval", "-1", "1"), "0 <= LO < HI"),
    (("--cfg-interval", "nan", "1"), "0 <= LO < HI"),
    (("--cfg-interval", "1", "x"), "is not a sigma"),
    (("--cfg-interval", "1", "2", "--scale", "1"), "--scale 1 has no guidance"),
    (("--tome", "0.8"), "--tome 0.8"),
    (("--tome", "-0.1"), "--tome -0.1"),
])
def test_bad_values_are_one_line_and_exit_2(micro, tmp_path, capsys, flags, message):
    assert main(_argv(micro, tmp_path / "o", *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "samples").exists()


def test_deepcache_at_few_steps_warns(micro, tmp_path, capsys):
    argv = [a for a in _argv(micro, tmp_path / "o", "--deepcache", "2") if a != "-q"]
    assert main(argv) == 0
    assert "warning: --deepcache 2 at 8 steps" in capsys.readouterr().err


def test_sd_img2img_takes_the_options_and_replays(micro, tmp_path, plain):
    init = tmp_path / "init.png"
    Image.fromarray(plain[0]).save(init)
    argv = _argv(micro, tmp_path / "o", "--init-img", str(init), "--strength", "0.75", "--deepcache", "2",
                 "--cfg-interval", "0.5", "inf", "--tome", "0.5")
    argv = [a for a in argv if a not in ("--H", "--W", "64")]
    assert main(argv, command="img2img") == 0
    _, meta, _, path = _image(tmp_path / "o")
    assert (meta["deepcache"], meta["cfg_interval"], meta["tome"]) == (2, [0.5, None], 0.5)
    assert main(["--replay", str(path), "--init-img", str(init), "--ckpt", str(micro["safetensors"]), "--config",
                 str(micro["config"]), "-q"], command="img2img") == 0


# --- the UNet calls: guidance interval, DeepCache's call counts ----------------------------------------


def _sigma_plan(sampler: str, steps: int) -> list[float]:
    """The sigma of every UNet evaluation of `sampler`, from the sampler's own grid (not from t)."""
    from sd_cli.sampling.common import k_plan
    from sd_cli.sampling.samplers import get_sampler
    from sd_cli.sampling.schedule import ddim_timesteps, make_alphas_cumprod, sigmas_from_alphas_cumprod

    ac = make_alphas_cumprod()
    if sampler == "ddim":
        discrete = sigmas_from_alphas_cumprod(ac.double())
        return [float(discrete[t]) for t in ddim_timesteps(steps)[::-1]]
    info = get_sampler(sampler)
    sig, _ = k_plan(ac, steps, info.schedule, info.discard_penultimate)
    if info.evals == 1:
        return sig[:-1]
    out = []
    for i in range(len(sig) - 1):  # heun: sigma_i, then sigma_{i+1} (the last step, to 0: one call)
        out += [sig[i]] + ([sig[i + 1]] if sig[i + 1] > 0 else [])
    return out


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim", "heun"])
def test_the_guided_call_is_skipped_exactly_outside_the_interval(pipe, calls, sampler):
    lo, hi = 0.5, 5.0
    plan = _sigma_plan(sampler, 10)
    assert all(abs(s - b) > 1e-3 * b for s in plan for b in (lo, hi))  # no sigma on a boundary
    _latents(pipe, sampler=sampler, steps=10, scale=5.0, cfg_interval=(lo, hi))
    assert [c["rows"] for c in calls.log] == [2 if lo <= s <= hi else 1 for s in plan]
    assert 0 < sum(c["rows"] == 1 for c in calls.log) < len(plan)


def _pattern(log: list[dict], n: int) -> list[bool]:
    """DeepCache's rule for a stream of len(log) calls: full at k % n == 0 and at the last."""
    return [k % n == 0 or k == len(log) - 1 for k in range(len(log))]


def _all_samplers():
    from sd_cli.sampling.samplers import SAMPLERS

    return [name for name, info in SAMPLERS.items() if info.alias_of is None]


@pytest.mark.parametrize("sampler", _all_samplers())
def test_deepcache_calls_are_full_every_n_and_at_the_end(pipe, calls, sampler):
    """txt2img and img2img (the calls from the start index on): as many calls as `pass_calls` says, full
    at k % 3 == 0 and at the last one, whatever the sampler's grid and order."""
    from sd_cli.pipeline.generate import pass_calls
    from sd_cli.sampling.samplers import get_sampler, img2img_start

    info = get_sampler(sampler)
    steps = 7 if sampler != "lcm" else 6
    _latents(pipe, sampler=sampler, steps=steps, scale=5.0, deepcache=3, eta=None)
    first = calls.log[:]
    assert len(first) == pass_calls(info, steps, None) == info.calls(steps)
    assert [c["full"] for c in first] == _pattern(first, 3) and not all(c["full"] for c in first)
    calls.log.clear()
    g = torch.Generator().manual_seed(5)
    init = torch.randn(1, 4, 8, 8, generator=g)
    t_enc = 4
    _latents(pipe, sampler=sampler, steps=steps, scale=5.0, deepcache=3, init=init, t_enc=t_enc)
    _, start = img2img_start(info, init, torch.zeros_like(init), pipe.model.alphas_cumprod, steps, None, t_enc)
    assert start > 0 and len(calls.log) == pass_calls(info, steps, None, start)
    assert [c["full"] for c in calls.log] == _pattern(calls.log, 3)


@pytest.mark.parametrize("sampler", _all_samplers())
def test_the_dry_run_counts_the_calls_inside_an_interval(sampler):
    """`interval_calls` runs the sampler without the UNet: an interval holding every sigma counts every
    call (txt2img and img2img), one holding none gives None, as does one that ends before the last call."""
    from sd_cli.pipeline.generate import interval_calls, pass_calls
    from sd_cli.sampling.samplers import get_sampler
    from sd_cli.sampling.schedule import make_alphas_cumprod

    info, ac = get_sampler(sampler), make_alphas_cumprod()
    steps = 7 if sampler != "lcm" else 6
    eta = info.resolve_eta(None)
    assert interval_calls(info, ac, steps, eta, {}, (0.0, INF)) == pass_calls(info, steps, None)
    assert interval_calls(info, ac, steps, eta, {"start": 2}, (0.0, INF)) == pass_calls(info, steps, None, 2)
    assert interval_calls(info, ac, steps, eta, {}, (100.0, INF)) is None
    assert interval_calls(info, ac, steps, eta, {}, (1.0, INF)) is None


def test_deepcache_with_an_interval_keeps_a_cond_stream_over_every_call(pipe, calls):
    """Uncond and cond as two calls, each its own stream: the cond call at every evaluation follows the
    every-N rule over all of them, the uncond calls over the guided ones (whose last call, before the end
    of the run, is not made full)."""
    _latents(pipe, sampler="dpmpp_2m", steps=10, scale=5.0, deepcache=4, cfg_interval=(0.5, INF))
    plan = _sigma_plan("dpmpp_2m", 10)
    guided = [s >= 0.5 for s in plan]
    assert all(c["rows"] == 1 for c in calls.log) and len(calls.log) == len(plan) + sum(guided)
    cond, uncond, i = [], [], 0
    for g in guided:  # per guided evaluation: uncond, then cond
        if g:
            uncond.append(calls.log[i])
            i += 1
        cond.append(calls.log[i])
        i += 1
    assert [c["full"] for c in cond] == _pattern(cond, 4)
    assert len(uncond) % 4 != 1 and [c["full"] for c in uncond] == [k % 4 == 0 for k in range(len(uncond))]


def test_deepcache_with_an_interval_to_the_end_makes_both_last_calls_full(pipe, calls):
    _latents(pipe, sampler="dpmpp_2m", steps=10, scale=5.0, deepcache=4, cfg_interval=(0.0, 5.0))
    assert calls.log[-1]["full"] and calls.log[-2]["full"]  # the last evaluation: uncond and cond


def test_deepcache_in_both_hires_passes(micro, calls, pipe):
    """A fresh DeepCache per pass: each pass (told apart by its latent size) keeps the every-N rule and
    ends with a full call."""
    from sd_cli.run.api import StableDiffusion
    from sd_cli.run.work import WorkPlan

    sd = StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), dtype="fp32", threads=1)
    sd._pipe = pipe  # (the pipeline the counter watches)
    gen = Generation.create(["a red circle"], sampler="euler", steps=8, height=64, width=64, hr_scale=2.0,
                            hr_steps=5, deepcache=2, watermark=False)
    sd.render(gen, WorkPlan(gen, {})[0])
    for size, n in ((8, 8), (16, 5)):
        stream = [c for c in calls.log if c["size"] == size]
        assert len(stream) == n and [c["full"] for c in stream] == _pattern(stream, 2)


def test_deepcache_sits_under_an_inpainting_models_concat():
    """An inpainting UNet: DeepCache wraps the raw 9-channel UNet, the [mask, masked image] concat stays
    outside, in both streams of a guidance interval."""
    from conftest import load_config_from_text
    from sd_cli.model.ldm import LatentDiffusion
    from sd_cli.pipeline.generate import Pipeline
    from test_inpaint_model import INPAINT_YAML

    torch.manual_seed(0)
    model = LatentDiffusion(load_config_from_text(INPAINT_YAML).model).eval()
    pipe = Pipeline(model, torch.device("cpu"))
    channels = []
    calls = Calls(model.model.diffusion_model)
    real = calls.unet.prepare
    calls.unet.prepare = lambda x, t, c: (channels.append(x.shape[1]), real(x, t, c))[1]
    try:
        with torch.inference_mode():
            _latents(pipe, sampler="dpmpp_2m", steps=8, scale=5.0, deepcache=2, cfg_interval=(1.0, INF))
    finally:
        calls.close()
    assert set(channels) == {9} and any(not c["full"] for c in calls.log) and calls.log[-1]["full"]


def test_fewer_unet_blocks_with_deepcache(pipe, calls):
    """Not a no-op: at interval 3 over 9 calls, 4 full calls (0, 3, 6 and the last) and 5 shallow ones."""
    _latents(pipe, sampler="euler", steps=9, scale=5.0, deepcache=3)
    assert sum(c["full"] for c in calls.log) == 4 and len(calls.log) == 9


# --- token merging is only there during sampling ---------------------------------------------------


def _patched(pipe) -> bool:
    blocks = [m for m in pipe.model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    return any("forward" in b.attn1.__dict__ or b._forward_pre_hooks for b in blocks)


def test_token_merging_is_removed_after_a_run_and_after_an_interrupt(micro, pipe):
    from sd_cli import StableDiffusion

    before = _latents(pipe, sampler="euler", steps=3, scale=5.0)
    merged = _latents(pipe, sampler="euler", steps=3, scale=5.0, tome=0.5)
    assert not _patched(pipe) and not torch.equal(before, merged)
    seen = []

    def stop(i, n, x):
        seen.append(_patched(pipe))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _latents(pipe, sampler="euler", steps=3, scale=5.0, tome=0.5, callback=stop)
    assert seen == [True] and not _patched(pipe)
    fresh = StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), dtype="fp32", threads=1)
    assert torch.equal(_latents(pipe, sampler="euler", steps=3, scale=5.0),
                       _latents(fresh.pipeline(), sampler="euler", steps=3, scale=5.0))
    assert torch.equal(merged, _latents(pipe, sampler="euler", steps=3, scale=5.0, tome=0.5))  # seeded: reproduces


# --- metadata: resume keys, --params, the A1111 text --------------------------------------------------


def test_resume_keys_tell_the_options_apart():
    from sd_cli.run.resume import work_key

    base = {"prompt": "p", "negative_prompt": "", "seed": 1, "batch_index": 0, "batch_size": 1, "n_samples": 1,
            "steps": 8, "sampler": "euler", "scale": 7.5, "eta": 0.0, "width": 64, "height": 64,
            "model_hash": "x", "dtype": "float32", "vae_decode": "whole", "watermark": False}
    keys = {work_key(base), work_key({**base, "deepcache": 2, "deepcache_branch": 0}),
            work_key({**base, "deepcache": 2, "deepcache_branch": 1}), work_key({**base, "cfg_interval": [1.0, None]}),
            work_key({**base, "cfg_interval": [1.0, 5.0]}), work_key({**base, "tome": 0.5})}
    assert len(keys) == 6
    assert work_key(base) == work_key({**base, "deepcache": 1, "deepcache_branch": 0, "cfg_interval": None,
                                       "tome": 0.0})  # absent = off


def test_resume_with_other_options_regenerates(micro, tmp_path):
    out = tmp_path / "o"
    assert main(_argv(micro, out, "--deepcache", "2")) == 0
    assert main(_argv(micro, out, "--deepcache", "2", "--resume")) == 0
    assert len(list((out / "samples").glob("*.png"))) == 1
    assert main(_argv(micro, out, "--deepcache", "3", "--resume")) == 0
    assert len(list((out / "samples").glob("*.png"))) == 2


def test_params_reads_the_fields_back():
    from sd_cli.output.a1111 import a1111_text
    from sd_cli.run.params import settings_from_infotext

    meta = {"prompt": "p", "negative_prompt": "", "steps": 20, "sampler_label": "Euler", "sampler": "euler",
            "scale": 7.0, "seed": 3, "width": 64, "height": 64, "model_hash": "h", "model_name": "m",
            "deepcache": 3, "deepcache_branch": 2, "cfg_interval": [0.28, 5.42], "tome": 0.5}
    found, unused = settings_from_infotext(a1111_text(meta, "normal"))
    assert (found["deepcache"], found["deepcache_branch"], found["cfg_interval"], found["tome"]) == (
        3, 2, (0.28, 5.42), 0.5) and unused == []
    found, _ = settings_from_infotext(a1111_text({**meta, "cfg_interval": [1e-05, None]}, "normal"))
    assert found["cfg_interval"] == (1e-05, INF)


def test_params_reads_a1111s_token_merging_and_ngms():
    from sd_cli.run.params import settings_from_infotext

    head = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
    found, unused = settings_from_infotext(head + "Token merging ratio: 0.5, NGMS: 2, NGMS all steps: True")
    assert (found["tome"], found["cfg_interval"], unused) == (0.5, (2.0, INF), [])
    found, unused = settings_from_infotext(head + "NGMS: 2")  # A1111 skips it only every other step
    assert "cfg_interval" not in found and unused[0].startswith("NGMS: 2 (A1111 skipped")
    found, unused = settings_from_infotext(head + "Token merging ratio: 0.9, Token merging ratio hr: 0.4")
    assert found["tome"] == 0.75 and len(unused) == 2
    with pytest.raises(UsageError, match="CFG interval"):
        settings_from_infotext(head + "CFG interval: 1..2")


def test_params_options_and_flags(tmp_path):
    text = ("a cat\nSteps: 30, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, DeepCache: 4, "
            "DeepCache branch: 1, CFG interval: 0.5-inf, Token merging ratio: 0.25")
    gen = _settings("--params", text)
    assert (gen.deepcache, gen.deepcache_branch, gen.cfg_interval, gen.tome) == (4, 1, (0.5, INF), 0.25)
    gen = _settings("--params", text, "--fast")  # the preset's options are flags: they win; ToMe is not one
    assert (gen.deepcache, gen.deepcache_branch, gen.cfg_interval, gen.tome) == (
        FAST_PRESET["deepcache"], FAST_PRESET["deepcache_branch"], FAST_PRESET["cfg_interval"], 0.25)
    assert _settings("--params", text, "--tome", "0").tome == 0


def test_replay_refuses_malformed_fields(tmp_path):
    from sd_cli.run.replay import ReplayError, recorded_faster

    assert recorded_faster({}, tmp_path) == {}
    assert recorded_faster({"cfg_interval": [1, None], "tome": 0.5, "deepcache": 2, "deepcache_branch": 0},
                           tmp_path) == {"cfg_interval": (1.0, INF), "tome": 0.5, "deepcache": 2, "deepcache_branch": 0}
    for bad in ({"deepcache": "3"}, {"cfg_interval": [1]}, {"cfg_interval": "1-2"}, {"tome": True}):
        with pytest.raises(ReplayError, match="malformed"):
            recorded_faster(bad, tmp_path)


def test_settings_validate_the_python_api_too():
    for bad in ({"deepcache": True}, {"deepcache": 2.0}, {"cfg_interval": (1.0,)}, {"cfg_interval": [0.0, 1.0]},
                {"cfg_interval": (1.0, 1.0)}, {"cfg_interval": (INF, INF)}, {"tome": "0.5"}):
        with pytest.raises(UsageError):
            Generation(("p",), **bad)


# --- eval_demo ------------------------------------------------------------------------------------------


def test_eval_demo_options_and_the_render_path():
    from sd_cli.cli.eval_demo import build_parser as eval_parser
    from sd_cli.run.eval_demo import EvalOptions, faster_label, generate, load_demo

    args = vars(eval_parser().parse_args(["--fast", "--tome", "0.3"]))
    opts = EvalOptions(**{**args, "cfg_interval": None})
    assert opts.faster(3.0) == {**FAST_PRESET, "tome": 0.3} and "cfg_interval" not in opts.faster(1.0)
    assert faster_label(opts.faster(3.0)).startswith("deepcache 3 (branch 0), cfg-interval 0.28-5.42, tome 0.3")
    assert faster_label({}) == "off"
    sd = load_demo()
    prompts = ["a red circle on a blue background"]
    full = generate(sd, prompts, "dpmpp_2m", 6, 3.0, 0)
    fast = generate(sd, prompts, "dpmpp_2m", 6, 3.0, 0, opts.faster(3.0))
    assert full.shape == fast.shape == (1, 64, 64, 3) and not np.array_equal(full, fast)


def test_cli_knows_the_settings_faster_keys():
    """The CLI's copy of the faster-sampling keys (kept so it imports without torch) is settings'."""
    from sd_cli.cli import FASTER
    from sd_cli.run.settings import FASTER_KEYS

    assert FASTER == FASTER_KEYS
