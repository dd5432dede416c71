"""A1111's prompt language (issue 14, parts 1-2): attention parsing, 75-token chunks with the comma
backtrack and BREAK, weights after the encoder, CLIP skip. References: the parse results A1111
documents, and the conditioning algorithm written out again here, independently of sd_cli."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sd_cli.model.tokenizer import BOS, EOS, get_tokenizer
from sd_cli.pipeline.conditioning import CHUNK, chunk_prompt
from sd_cli.pipeline.prompt_syntax import parse_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# A1111's own examples (modules/prompt_parser.py, parse_prompt_attention's docstring).
@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_parse_matches_a1111_documented_results(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_break_and_escapes():
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_attention("[x]") == [("x", pytest.approx(1 / 1.1))]
    assert parse_attention("\\\\ and )") == [("\\ and )", 1.0)]  # a closer with no opener is text


def _words(n: int, group: int = 1) -> str:
    """A prompt of n one-token words, a comma after every `group` of them."""
    vocab = ["cat", "dog", "tree", "house", "red", "blue", "sky", "sun", "moon", "star"]
    groups = [" ".join(vocab[(i + j) % len(vocab)] for j in range(group)) for i in range(0, n, group)]
    return ", ".join(groups)


def _content(c) -> list[list[int]]:
    return [[t for t in ids[1:-1] if t != EOS] for ids in c.ids]


def test_chunks_of_a_200_token_prompt_with_commas():
    """Groups of 5 words and a comma: a chunk fills at 75 tokens, three past its last comma, so those three
    move to the next chunk (A1111's 20-token comma backtrack): chunks of 72 tokens, each ending in a comma."""
    tok = get_tokenizer()
    text = _words(170, group=5)  # 170 words + 33 commas = 203 tokens
    tokens = tok.encode(text)
    assert len(tokens) == 203
    c = chunk_prompt(text, tok)
    assert all(len(ids) == 77 and ids[0] == BOS and ids[-1] == EOS for ids in c.ids)
    content = _content(c)
    assert sum(content, []) == tokens  # nothing lost, nothing reordered
    comma = tok.encode(",")[0]
    assert [len(part) for part in content] == [72, 72, 59]
    assert all(part[-1] == comma for part in content[:-1])
    assert c.token_count == 75 + 75 + 59  # A1111 counts every full chunk as 75
    # A comma farther than 20 tokens back moves nothing: groups of 50 words.
    wide = chunk_prompt(_words(150, group=50), tok)
    assert [len(part) for part in _content(wide)][0] == 75


def test_break_starts_a_new_chunk_and_long_runs_without_commas_cut_at_75():
    tok = get_tokenizer()
    c = chunk_prompt("red cat BREAK blue dog", tok)
    assert len(c.ids) == 2 and c.ids[1][1:3] == tuple(tok.encode("blue dog"))
    b = chunk_prompt(_words(90, group=5) + " BREAK sun", tok)
    assert _content(b)[-1] == tok.encode("sun") and sum(_content(b)[:-1], []) == tok.encode(_words(90, group=5))
    long = " ".join(["cat"] * 160)  # no comma: plain cuts at 75
    c = chunk_prompt(long, tok)
    assert [sum(t != EOS for t in ids[1:-1]) for ids in c.ids] == [75, 75, 10] and c.token_count == 160


def _reference_context(model, pieces: list[tuple[str, float]], clip_skip: int) -> torch.Tensor:
    """The A1111 algorithm written out again: one chunk, each piece tokenized alone, the encoder's layer
    -clip_skip through the final layer norm, weights times vectors, mean restored."""
    tok = get_tokenizer()
    ids, weights = [BOS], [1.0]
    for text, w in pieces:
        t = tok.encode(text)
        ids += t
        weights += [w] * len(t)
    ids += [EOS] * (77 - len(ids))
    weights += [1.0] * (77 - len(weights))
    tm = model.cond_stage_model.transformer.text_model
    out = tm(input_ids=torch.tensor([ids]), output_hidden_states=True)
    z = tm.final_layer_norm(out.hidden_states[-clip_skip]) if clip_skip > 1 else out.last_hidden_state
    mean = z.mean()
    z = z * torch.tensor(weights).reshape(1, 77, 1)
    return z * (mean / z.mean())


@pytest.fixture(scope="module")
def tiny_pipe(tiny_files):
    from sd_cli.pipeline.generate import Pipeline
    from sd_cli.weights.config import load_config
    from sd_cli.weights.loading import load_model

    cfg = load_config(tiny_files["config"])
    model = load_model(cfg.model, tiny_files["safetensors"], device="cpu", dtype=torch.float32)
    return Pipeline(model, torch.device("cpu"), on_warning=lambda m: None)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_weighted_conditioning_and_images_equal_the_reference(tiny_pipe, clip_skip):
    prompt = "a (red:1.5) cat on [a] mat"
    pieces = [("a ", 1.0), ("red", 1.5), (" cat on ", 1.0), ("a", 1 / 1.1), (" mat", 1.0)]
    with torch.inference_mode():
        ours = tiny_pipe._encode([prompt], "prompt", "a1111", clip_skip)
        ref = _reference_context(tiny_pipe.model, pieces, clip_skip)
    assert ours.shape == (1, 77, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)

    def images(encode):
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
        pipe_encode = tiny_pipe._encode
        tiny_pipe._encode = encode
        try:
            return tiny_pipe.generate([prompt], noise, sampler="ddim", steps=3, scale=5.0, prompt_syntax="a1111",
                                      clip_skip=clip_skip)
        finally:
            tiny_pipe._encode = pipe_encode

    real = images(tiny_pipe._encode)
    referenced = images(lambda texts, what, syntax="plain", skip=1: ref if what == "prompt"
                        else tiny_pipe._encode.__func__(tiny_pipe, texts, what, syntax, skip))
    assert np.abs(real.astype(int) - referenced.astype(int)).max() <= 1


def test_no_brackets_gives_the_plain_numbers_bit_for_bit(tiny_pipe):
    text = "a cat, sitting on a mat, in the sun"
    with torch.inference_mode():
        assert torch.equal(tiny_pipe._encode([text], "prompt", "a1111"), tiny_pipe._encode([text], "prompt", "plain"))


def test_long_prompt_and_negative_of_other_lengths_run(tiny_pipe):
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ctx = tiny_pipe._encode([_words(100), "cat"], "prompt", "a1111")
    assert ctx.shape == (2, 77 * 3, 32)  # the short prompt padded with empty chunks to the batch's count
    out = tiny_pipe.generate([_words(100), "cat"], noise, negative_prompt="dog", sampler="ddim", steps=2, scale=5.0,
                             prompt_syntax="a1111")
    assert out.shape == (2, 64, 64, 3)


_soup = st.lists(st.sampled_from(list("()[]:\\ ab,.1-+") + [" BREAK ", " AND ", "1e9", "0.0", ":1e308)", "|"]),
                 max_size=60).map("".join)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_soup)
def test_fuzz_bracket_soup_parses_and_chunks(text):
    pieces = parse_attention(text)
    assert pieces and all(isinstance(t, str) and isinstance(w, float) for t, w in pieces)
    c = chunk_prompt(text, get_tokenizer())
    assert all(len(ids) == 77 for ids in c.ids) and len(c.weights) == len(c.ids)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(_soup)
def test_fuzz_through_the_cli_is_an_image_or_one_error(micro, tmp_path_factory, text):
    from micro_model import micro_argv

    from sd_cli.cli import main

    out = tmp_path_factory.mktemp("soup")
    rc = main(micro_argv(micro, out, "--prompt", text or "x", "--negative-prompt", text[::-1]))
    assert rc in (0, 1, 2)


# --------------------------------------------------------------------------------------------------
# Extra-network tags (<lora:NAME:W>): taken out of the text, refused clearly when malformed
# --------------------------------------------------------------------------------------------------


def test_lora_tags_are_taken_out_and_parsed():
    from sd_cli.pipeline.prompt_syntax import extra_networks

    text, tags = extra_networks("(a castle:1.2), <lora:style:0.8>, x <lora:b:0.5:1> <lyco:c:te=0.2:unet=-1> <lora:d>")
    assert text == "(a castle:1.2), , x   "  # A1111 removes the tag and nothing else
    assert [(t.name, t.te, t.unet) for t in tags] == [("style", 0.8, 0.8), ("b", 0.5, 1.0), ("c", 0.2, -1.0),
                                                      ("d", 1.0, 1.0)]
    tok = get_tokenizer()
    assert chunk_prompt("a castle <lora:style:0.8>", tok).ids == chunk_prompt("a castle ", tok).ids


@pytest.mark.parametrize("prompt, message", [
    ("a <lora:x:abc>", "'abc' is not a LoRA weight"),
    ("a <lora:x:nan>", "not a LoRA weight"),
    ("a <lora:x:1:2:3>", "write <lora:NAME>"),
    ("a <lora: :1>", "write <lora:NAME>"),
    ("a <lora:x:dyn=4>", "dyn= is not a LoRA setting"),
    ("a <hypernet:x:1>", "'hypernet' networks are not something this tool applies"),
])
def test_malformed_tags_are_one_clear_error(prompt, message):
    from sd_cli.errors import UsageError
    from sd_cli.pipeline.prompt_syntax import check_a1111

    with pytest.raises(UsageError, match=message):
        check_a1111(prompt)


def test_a_lora_tag_in_the_negative_prompt_is_refused():
    from sd_cli.errors import UsageError
    from sd_cli.pipeline.prompt_syntax import check_a1111

    check_a1111("a <lora:x:1>")
    with pytest.raises(UsageError, match="LoRA tags go in the prompt"):
        check_a1111("blurry <lora:x:1>", negative=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("<>:=lorayc.-0123456789 ex\\()[]")), max_size=60))
def test_tag_parsing_never_fails_otherwise(text):
    """Any text: the tags parse, or one UsageError says why; the rest of the text is what is left."""
    from sd_cli.errors import UsageError
    from sd_cli.pipeline.prompt_syntax import check_a1111, extra_networks

    try:
        rest, tags = extra_networks(text)
        check_a1111(text)
    except UsageError:
        return
    assert len(rest) <= len(text) and all(t.text in text for t in tags)
