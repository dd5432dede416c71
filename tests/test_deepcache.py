"""DeepCache (sd_cli/model/deepcache.py) on a tiny random UNet: the split of the UNet is exact, the call
schedule follows interval / last call, guidance's separate calls keep separate caches, and skipping costs
accuracy and saves blocks and FLOPs in the expected direction."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sd_cli.model.deepcache import DeepCacheUNet
from sd_cli.model.layers import norm_groups, use_channels_last
from sd_cli.model.unet import UNetConfig, UNetModel
from sd_cli.pipeline.guidance import guided_eps_model
from sd_cli.sampling.samplers import get_sampler
from sd_cli.sampling.schedule import make_alphas_cumprod

# 3 levels (attention at the first two), 1 ResBlock each: input blocks = conv_in, res+attn, down,
# res+attn, down, res -> L = 6; output blocks 0-1 (8/4 = 4x4 for 16x16 latents), 2-3, 4-5.
CFG = UNetConfig(model_channels=32, attention_resolutions=(1, 2), num_res_blocks=1, channel_mult=(1, 2, 2),
                 num_heads=2, context_dim=32)
AC = make_alphas_cumprod()
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # 80x faster on a loaded 2-core machine


def tiny_unet(cfg: UNetConfig = CFG, seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    with norm_groups(8):
        unet = UNetModel(cfg)
    with torch.no_grad():  # make the deep path matter: larger residual branches than the default init
        for p in unet.parameters():
            p.mul_(1.5)
    return unet.eval()


def inputs(batch: int = 2, size: int = 16, length: int = 77, seed: int = 1, channels: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.full((batch,), 500.0)
    c = torch.randn(batch, length, CFG.context_dim, generator=g)
    return x, t, c


def reference_forward(unet: UNetModel, x, t, context):
    """UNetModel.forward as it was before the prepare / run_input_blocks / run_output_blocks split."""
    from sd_cli.model.unet import timestep_embedding

    dtype = unet.time_embed[0].weight.dtype
    emb = unet.time_embed(timestep_embedding(t, unet.cfg.model_channels).to(dtype))
    context = context.to(dtype)
    h = x.to(dtype).contiguous(memory_format=unet.memory_format)
    skips = []
    for block in unet.input_blocks:
        h = block(h, emb, context)
        skips.append(h)
    h = unet.middle_block(h, emb, context)
    for block in unet.output_blocks:
        h = torch.cat([h, skips.pop()], dim=1)
        up_size = tuple(skips[-1].shape[-2:]) if skips else None
        h = block(h, emb, context, up_size)
    return unet.out(h).to(x.dtype)


def sample(unet, steps=8, sampler="ddim", cond_len=77, uncond_len=77, scale=5.0, seed=3):
    """Final latents (2, 4, 16, 16) of a guided run of `sampler` with `unet(x, t, context)`."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(2, cond_len, CFG.context_dim, generator=g)
    uncond = torch.randn(1, uncond_len, CFG.context_dim, generator=g)
    eps = guided_eps_model(unet, cond, uncond, scale)
    with torch.inference_mode():
        return get_sampler(sampler).fn(eps, x_T, AC, steps)


# --- the UNet's split ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 18])  # 18: odd levels (18 -> 9 -> 5), Upsample to the skip's size
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_is_bit_identical_to_the_unsplit_forward(size, channels_last):
    unet = tiny_unet()
    if channels_last:
        use_channels_last(unet)
    x, t, c = inputs(size=size)
    with torch.inference_mode():
        assert torch.equal(unet(x, t, c), reference_forward(unet, x, t, c))
    with torch.enable_grad():  # autograd recording: the not-in-place branch of add_fresh
        assert torch.equal(unet(x, t, c), reference_forward(unet, x, t, c))


@pytest.mark.parametrize("branch", range(6))
def test_a_shallow_call_on_the_cache_of_the_same_inputs_equals_the_full_call(branch):
    unet = tiny_unet()
    dc = DeepCacheUNet(unet, interval=3, branch=branch)
    x, t, c = inputs()
    with torch.inference_mode():
        full = unet(x, t, c)
        first = dc(x, t, c)  # call 0: full, fills the cache
        second = dc(x, t, c)  # call 1: shallow at the same (x, t, context)
    assert (dc.full_calls, dc.shallow_calls) == (1, 1)
    assert torch.equal(first, full)
    torch.testing.assert_close(second, full, rtol=1e-6, atol=1e-6)
    # ... and the cache matters: a shallow call (call 2) at another t is not the full call there.
    with torch.inference_mode():
        other_t = torch.full_like(t, 100.0)
        assert not torch.allclose(dc(x, other_t, c), unet(x, other_t, c), atol=1e-4)


def test_interval_1_is_the_plain_unet_over_a_whole_run():
    unet = tiny_unet()
    plain = sample(unet, steps=6, sampler="dpmpp_2m")
    dc = DeepCacheUNet(unet, interval=1, branch=0, total_calls=get_sampler("dpmpp_2m").calls(6))
    assert torch.equal(sample(dc, steps=6, sampler="dpmpp_2m"), plain)
    assert dc.shallow_calls == 0 and dc.full_calls == 6


def test_the_inpainting_unet_is_wrapped_under_the_concat():
    cfg = UNetConfig(**{**CFG.__dict__, "in_channels": 9})
    unet = tiny_unet(cfg)
    x, t, c = inputs()
    cc = torch.randn(1, 5, 16, 16)
    dc = DeepCacheUNet(unet, interval=2)

    def with_concat(model, x, t, c):  # as Pipeline._unet: [x, mask, masked-image latents] -> 9 channels
        return model(torch.cat([x, cc.expand(x.shape[0], -1, -1, -1)], dim=1), t, c)

    with torch.inference_mode():
        assert torch.equal(with_concat(dc, x, t, c), with_concat(unet, x, t, c))
        torch.testing.assert_close(with_concat(dc, x, t, c), with_concat(unet, x, t, c), rtol=1e-6, atol=1e-6)
    assert dc.shallow_calls == 1


# --- the call schedule ---------------------------------------------------------------------------


class Recording(DeepCacheUNet):
    """Records per call: (x batch, context length, full?)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple[int, int, bool]] = []

    def __call__(self, x, t, context):
        before = self.full_calls
        out = super().__call__(x, t, context)
        self.log.append((x.shape[0], context.shape[1], self.full_calls > before))
        return out


def expected_pattern(total: int, interval: int) -> list[bool]:
    return [k % interval == 0 or k == total - 1 for k in range(total)]


@pytest.mark.parametrize("interval", [2, 3])
def test_calls_counted_per_unet_call_with_a_two_evals_sampler(interval):
    info = get_sampler("heun")
    assert info.evals == 2
    steps = 5
    total = info.calls(steps)  # 2 * 5 - 1 = 9: every UNet call counts, not every step
    assert total == 9
    dc = Recording(tiny_unet(), interval=interval, branch=1, total_calls=total)
    sample(dc, steps=steps, sampler="heun")
    assert [full for _, _, full in dc.log] == expected_pattern(total, interval)
    assert dc.log[-1][2]  # the last call is full, whatever the interval
    assert dc.full_calls + dc.shallow_calls == total


def test_without_total_calls_only_the_interval_decides():
    dc = Recording(tiny_unet(), interval=3)
    sample(dc, steps=7, sampler="ddim")
    total = get_sampler("ddim").calls(7)  # 8: the CompVis grid for 7 steps has 8 points
    assert [full for _, _, full in dc.log] == [k % 3 == 0 for k in range(total)]
    assert not dc.log[-1][2]  # call 7: 7 % 3 != 0, shallow


def test_separate_uncond_and_cond_calls_keep_separate_caches():
    unet = tiny_unet()
    info, steps, interval = get_sampler("ddim"), 7, 2
    total = info.calls(steps)
    # Negative prompt 77 tokens, prompt 154: guidance makes two calls per evaluation (uncond, then cond).
    dc = Recording(unet, interval=interval, branch=2, total_calls=total)
    got = sample(dc, steps=steps, cond_len=154, uncond_len=77)
    assert [(b, n) for b, n, _ in dc.log] == [(2, 77), (2, 154)] * total
    # Each of the two streams is counted on its own: the same pattern in both, the last call of each full.
    assert [f for _, n, f in dc.log if n == 77] == expected_pattern(total, interval)
    assert [f for _, n, f in dc.log if n == 154] == expected_pattern(total, interval)
    assert len(dc._slots) == 2

    # The same run with one wrapper per stream, so nothing can be shared: equal latents.
    per_stream = {n: DeepCacheUNet(unet, interval=interval, branch=2, total_calls=total) for n in (77, 154)}
    assert torch.equal(sample(lambda x, t, c: per_stream[c.shape[1]](x, t, c), steps=steps, cond_len=154,
                              uncond_len=77), got)
    # ... and the two caches hold different features (so sharing one would have changed the result).
    f_u, f_c = (dc._slots[key].feature for key in sorted(dc._slots, key=lambda k: k[1][1]))
    assert f_u.shape == f_c.shape and not torch.allclose(f_u, f_c)


def test_one_batched_guided_call_is_one_slot():
    dc = Recording(tiny_unet(), interval=2, total_calls=5)
    sample(dc, steps=5)
    assert [(b, n) for b, n, _ in dc.log] == [(4, 77)] * 5 and len(dc._slots) == 1


def test_reset_forgets_caches_and_counts():
    dc = DeepCacheUNet(tiny_unet(), interval=3, total_calls=4)
    first = sample(dc, steps=4)
    dc.reset(4)
    assert (dc.full_calls, dc.shallow_calls, dc._slots) == (0, 0, {})
    assert torch.equal(sample(dc, steps=4), first)


@pytest.mark.parametrize("kwargs", [{"interval": 0}, {"interval": 1.5}, {"interval": True}, {"branch": -1},
                                    {"branch": 6}, {"total_calls": 0}, {"total_calls": 2.0}])
def test_bad_arguments(kwargs):
    args = {"interval": 2, **kwargs}
    with pytest.raises(ValueError):
        DeepCacheUNet(tiny_unet(), **args)


# --- what skipping costs and saves ------------------------------------------------------------------


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_more_skipping_moves_further_from_the_full_run():
    unet = tiny_unet()
    steps, sampler = 20, "ddim"
    total = get_sampler(sampler).calls(steps)
    full = sample(unet, steps=steps, sampler=sampler)
    dist = {}
    for interval in (1, 2, 3, 5):
        dc = DeepCacheUNet(unet, interval=interval, branch=0, total_calls=total)
        dist[interval] = relative_distance(sample(dc, steps=steps, sampler=sampler), full)
    assert dist[1] == 0.0
    assert 0.0 < dist[2] < dist[3] < dist[5], dist


def test_a_deeper_branch_stays_closer_to_the_full_run():
    unet = tiny_unet()
    total = get_sampler("ddim").calls(20)
    full = sample(unet, steps=20)
    dist = [relative_distance(sample(DeepCacheUNet(unet, 3, b, total), steps=20), full) for b in (0, 2, 4)]
    assert dist[0] > dist[1] > dist[2] > 0.0, dist


def count_blocks(unet: UNetModel, call) -> int:
    count = [0]
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    handles = [b.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1)) for b in blocks]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    return count[0]


def flops(call) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def test_a_shallow_call_runs_2_b_plus_2_blocks():
    unet = tiny_unet()
    x, t, c = inputs()
    with torch.inference_mode():
        for branch in range(6):
            dc = DeepCacheUNet(unet, interval=2, branch=branch)
            n_full = count_blocks(unet, lambda: dc(x, t, c))
            n_shallow = count_blocks(unet, lambda: dc(x, t, c))
            assert (n_full, n_shallow) == dc.block_calls() == (13, 2 * (branch + 1))


def test_a_shallow_call_costs_fewer_flops_the_shallower_its_branch():
    """FLOPs counted on a meta-device copy of the tiny model (shapes only, nothing computed)."""
    with torch.device("meta"), norm_groups(8):
        unet = UNetModel(CFG)
        x, t, c = (v.to("meta") for v in inputs())
    shallow = []
    with torch.inference_mode():
        f_plain = flops(lambda: unet(x, t, c))
        for branch in range(6):
            dc = DeepCacheUNet(unet, interval=2, branch=branch)
            if branch == 0:
                assert flops(lambda: dc(x, t, c)) == f_plain  # call 0: full, the same operations as forward
            else:
                dc(x, t, c)
            shallow.append(flops(lambda: dc(x, t, c)))
    # Measured shares of the full call: 0.14, 0.41, 0.64, 0.88, 0.93, 0.96 (branch 0: conv_in and the last
    # output block, a ResBlock + attention at full resolution).
    assert shallow == sorted(shallow) and 0 < shallow[0] < 0.2 * f_plain and shallow[-1] < f_plain


def test_full_size_sd1_flops_per_shallow_call():
    """SD v1 at 512 px (64x64 latents, guided batch 2) on the meta device: FLOPs counted, nothing computed."""
    with torch.device("meta"):
        unet = UNetModel(UNetConfig())
        x, t, c = torch.empty(2, 4, 64, 64), torch.empty(2), torch.empty(2, 77, 768)
    with torch.inference_mode():
        f_plain = flops(lambda: unet(x, t, c))  # about 1.61 TFLOP
        share = []
        for branch in (0, 1, 2, 11):
            dc = DeepCacheUNet(unet, interval=2, branch=branch)
            dc(x, t, c)
            share.append(flops(lambda: dc(x, t, c)) / f_plain)
    # Measured: 0.079, 0.224, 0.380, 0.985 -> at interval 3, branch 0: 3 / (1 + 2 * 0.079) = 2.6x fewer FLOPs.
    assert 1.5e12 < f_plain < 1.7e12
    assert share[0] < 0.09 and share[1] < 0.25 and share[2] < 0.4 and 0.95 < share[3] < 1.0


def test_it_composes_with_token_merging():
    from sd_cli.model.tome import TokenMerging

    unet = tiny_unet()
    x, t, c = inputs()
    with torch.inference_mode(), TokenMerging(unet, 0.5, use_rand=False):  # fixed destinations: repeatable
        full = unet(x, t, c)
        dc = DeepCacheUNet(unet, interval=3, branch=1)
        assert torch.equal(dc(x, t, c), full)
        torch.testing.assert_close(dc(x, t, c), full, rtol=1e-6, atol=1e-6)  # shallow: input block 1 merges too
        assert dc.shallow_calls == 1
