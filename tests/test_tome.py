"""Token merging (sd_cli/model/tome.py): the matching against a written-out reference of the paper's
algorithm, exact round trips, the patch (which blocks, how many tokens attn1 sees, ratio 0 and undo
bit-identical) and reproducible destination draws."""

from __future__ import annotations

import pytest
import torch

from sd_cli.model.layers import norm_groups
from sd_cli.model.tome import TokenMerging, bipartite_soft_matching, dst_mask, transformer_downsamples
from sd_cli.model.unet import UNetConfig, UNetModel
from sd_cli.pipeline.guidance import guided_eps_model
from sd_cli.sampling.samplers import get_sampler
from sd_cli.sampling.schedule import make_alphas_cumprod

# Attention at downsampling 1 and 2: input block 1 (16x16 tokens for 16x16 latents), 4 (8x8), output
# blocks 2, 3 (8x8) and 4, 5 (16x16); the middle block's transformer at 4x4.
CFG = UNetConfig(model_channels=32, attention_resolutions=(1, 2), num_res_blocks=1, channel_mult=(1, 2, 2),
                 num_heads=2, context_dim=32)
AC = make_alphas_cumprod()
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # 80x faster on a loaded 2-core machine


def tiny_unet(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    with norm_groups(8):
        return UNetModel(CFG).eval()


def inputs(batch: int = 2, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.full((batch,), 400.0),
            torch.randn(batch, 77, CFG.context_dim, generator=g))


def sample(unet, steps: int = 4, seed: int = 3, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 4, 16, 16, generator=g)
    cond, uncond = torch.randn(batch, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.inference_mode():
        return get_sampler("ddim").fn(guided_eps_model(unet, cond, uncond, 5.0), x_T, AC, steps)


# --- the reference: bipartite soft matching written out token by token ------------------------------


def reference_merge_unmerge(metric: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, r: int):
    """(merged (B, N-r, C), unmerged (B, N, C)) of x, by the paper: sources A = the non-dst tokens,
    destinations B = the dst tokens; each a in A draws its most similar b (cosine); the r edges with the
    highest similarity are kept; each b becomes the mean of itself and the a merged into it; unmerging
    copies a merged token's value back to each of its tokens."""
    src = [i for i in range(mask.numel()) if not mask[i]]
    dst = [i for i in range(mask.numel()) if mask[i]]
    merged_out, unmerged_out = [], []
    for row_m, row_x in zip(metric, x):
        best = []
        for a in src:
            sims = [float(torch.dot(row_m[a], row_m[b]) / (row_m[a].norm() * row_m[b].norm())) for b in dst]
            j = max(range(len(dst)), key=lambda k: (sims[k], -k))  # the first of equal maxima
            best.append((sims[j], j))
        by_score = sorted(range(len(src)), key=lambda k: -best[k][0])  # stable: ties keep token order
        merged, kept = by_score[:r], by_score[r:]
        groups = {j: [row_x[dst[j]]] for j in range(len(dst))}
        for k in merged:
            groups[best[k][1]].append(row_x[src[k]])
        means = [torch.stack(groups[j]).mean(dim=0) for j in range(len(dst))]
        merged_out.append(torch.stack([row_x[src[k]] for k in kept] + means))
        out = row_x.clone()
        for k in merged:
            out[src[k]] = means[best[k][1]]
        for j in range(len(dst)):
            out[dst[j]] = means[j]
        unmerged_out.append(out)
    return torch.stack(merged_out), torch.stack(unmerged_out)


@pytest.mark.parametrize("h, w, r", [(4, 4, 6), (6, 4, 10), (5, 7, 9), (4, 4, 12), (4, 4, 30)])
@pytest.mark.parametrize("rand", [False, True])
def test_merge_and_unmerge_match_the_written_out_algorithm(h, w, r, rand):
    g = torch.Generator().manual_seed(h * 100 + w * 10 + r)
    metric = torch.randn(3, h * w, 8, generator=g)
    x = torch.randn(3, h * w, 5, generator=g)  # other features than the metric, as attn1's input
    mask = dst_mask(h, w, 2, 2, torch.Generator().manual_seed(r) if rand else None)
    merge, unmerge = bipartite_soft_matching(metric, mask, r)
    r_eff = min(r, int((~mask).sum()))  # (4, 4, 30): at most every source
    ref_merged, ref_out = reference_merge_unmerge(metric, x, mask, r_eff)
    merged = merge(x)
    assert merged.shape == (3, h * w - r_eff, 5)
    torch.testing.assert_close(merged, ref_merged, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unmerge(merged), ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unmerge(ref_merged), ref_out, rtol=1e-6, atol=1e-6)


def test_the_destinations_one_per_whole_cell():
    top_left = dst_mask(5, 7).reshape(5, 7)  # whole 2x2 cells: 2 x 3; row 4 and column 6 all sources
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[0:4:2, 0:6:2] = True
    assert torch.equal(top_left, expected)
    drawn = dst_mask(8, 6, 2, 2, torch.Generator().manual_seed(0)).reshape(4, 2, 3, 2)  # (cell row, dy, col, dx)
    assert torch.equal(drawn.sum(dim=(1, 3)), torch.ones(4, 3, dtype=torch.long))
    assert not torch.equal(drawn.reshape(8, 6), dst_mask(8, 6).reshape(8, 6))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(dst_mask(8, 8, 2, 2, g1), dst_mask(8, 8, 2, 2, g2))


@pytest.mark.parametrize("rand", [False, True])
def test_merge_then_unmerge_is_exact_on_tokens_equal_within_their_merged_groups(rand):
    # Every 2x2 cell holds one integer-valued vector 4 times, so each source's best destination is its own
    # cell's (similarity 1) and a mean of equal integers is exact: the round trip returns x bit for bit.
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(-8, 9, (2, 4, 4, 16), generator=g).float()  # (B, h/2, w/2, C)
    x = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, 64, 16)  # (B, 8*8, C)
    mask = dst_mask(8, 8, 2, 2, torch.Generator().manual_seed(1) if rand else None)
    for r in (1, 20, 48):  # 48: every source
        merge, unmerge = bipartite_soft_matching(x, mask, r)
        merged = merge(x)
        assert merged.shape == (2, 64 - r, 16)
        assert torch.equal(unmerge(merged), x)


# --- the patch ------------------------------------------------------------------------------------------


def attn1_tokens(unet: UNetModel, call) -> dict[str, int]:
    """Tokens each attn1 sees (its to_q input) during `call`, by module name."""
    seen, handles = {}, []
    for name, module in unet.named_modules():
        if name.endswith("attn1.to_q"):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: seen.__setitem__(name, args[0].shape[1])))
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_only_the_full_resolution_blocks_are_patched():
    unet = tiny_unet()
    levels = [ds for _, ds in transformer_downsamples(unet)]
    assert levels == [1, 2, 4, 2, 2, 1, 1]  # input 1, 4; middle; output 2, 3, 4, 5
    tome = TokenMerging(unet, 0.5)
    assert len(tome.blocks) == 3
    assert len(TokenMerging(unet, 0.5, max_downsample=2).blocks) == 6
    assert len(TokenMerging(unet, 0.5, max_downsample=4).blocks) == 7


@pytest.mark.parametrize("ratio, expect", [(0.5, 128), (0.3, 180), (0.75, 64), (0.9, 64)])
def test_attn1_sees_the_tokens_reduced_by_the_ratio(ratio, expect):
    unet = tiny_unet()
    x, t, c = inputs()
    plain = attn1_tokens(unet, lambda: unet(x, t, c))
    with torch.inference_mode(), TokenMerging(unet, ratio):
        merged = attn1_tokens(unet, lambda: unet(x, t, c))
    full_res = {k for k, n in plain.items() if n == 256}
    assert len(full_res) == 3
    # 16x16 = 256 tokens -> 256 - int(256 * ratio); 0.75 = 1 - 1/4: every source merged; past it no more.
    assert {k: merged[k] for k in full_res} == {k: expect for k in full_res}
    assert {k: n for k, n in merged.items() if k not in full_res} == {k: n for k, n in plain.items()
                                                                        if k not in full_res}


def test_ratio_0_is_bit_identical_and_remove_restores_the_unet():
    unet = tiny_unet()
    x, t, c = inputs()
    with torch.inference_mode():
        plain = unet(x, t, c)
        with TokenMerging(unet, 0.0):
            assert torch.equal(unet(x, t, c), plain)
        tome = TokenMerging(unet, 0.5).apply()
        merged = unet(x, t, c)
        assert not torch.allclose(merged, plain, atol=1e-4)
        tome.remove()
        assert torch.equal(unet(x, t, c), plain)
    for module in unet.modules():
        assert not module._forward_pre_hooks and "forward" not in module.__dict__
    assert torch.equal(sample(unet), sample(unet))


def test_merged_output_stays_near_the_plain_one():
    unet = tiny_unet()
    x, t, c = inputs()
    with torch.inference_mode():
        plain = unet(x, t, c)
        dist = {}
        for ratio in (0.25, 0.5, 0.75):
            with TokenMerging(unet, ratio):
                dist[ratio] = float((unet(x, t, c) - plain).norm() / plain.norm())
    assert 0 < dist[0.25] < dist[0.75] < 0.5, dist


def test_runs_reproduce():
    unet = tiny_unet()
    with TokenMerging(unet, 0.5, seed=7):
        first = sample(unet, batch=1)  # guided: batch 2 per call, random destinations
    with TokenMerging(unet, 0.5, seed=7):
        second = sample(unet, batch=1)
    assert torch.equal(first, second)
    with TokenMerging(unet, 0.5, seed=7) as tome:  # one patch, two runs: reset() between them
        a = sample(unet, batch=1)
        b = sample(unet, batch=1)
        tome.reset()
        c = sample(unet, batch=1)
    assert torch.equal(a, first) and torch.equal(c, first) and not torch.equal(b, first)
    with TokenMerging(unet, 0.5, seed=8):
        assert not torch.equal(sample(unet, batch=1), first)
    with TokenMerging(unet, 0.5, use_rand=False):
        fixed = sample(unet, batch=1)
    with TokenMerging(unet, 0.5, use_rand=False, seed=8):
        assert torch.equal(sample(unet, batch=1), fixed)


def test_an_odd_batch_uses_the_fixed_destinations():
    unet = tiny_unet()
    x, t, c = inputs(batch=1)
    with torch.inference_mode():
        with TokenMerging(unet, 0.5, seed=3):
            drawn = unet(x, t, c)
        with TokenMerging(unet, 0.5, use_rand=False):
            assert torch.equal(unet(x, t, c), drawn)


def test_misuse():
    unet = tiny_unet()
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            TokenMerging(unet, bad)
    with pytest.raises(ValueError):
        TokenMerging(unet, 0.5, sx=0)
    tome = TokenMerging(unet, 0.5).apply()
    with pytest.raises(RuntimeError):
        tome.apply()
    with pytest.raises(RuntimeError):
        TokenMerging(unet, 0.3).apply()
    tome.remove()
    tome.remove()  # twice: harmless
    TokenMerging(unet, 0.3).apply().remove()
