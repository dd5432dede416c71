"""Prompt editing (`[from:to:when]`, `[to:when]`, `[from::when]`, `[a|b]`), as AUTOMATIC1111 computes it.

References:
* A1111's documented schedules (the examples in its modules/prompt_parser.py), written out below;
* A1111's own parser: its lark grammar (written out as the reference, `GRAMMAR`) parsed by lark, the
  library A1111 uses, with the step rule written out from A1111's description. Lark's Earley parser
  resolves a few ambiguous texts (an edit directly followed by stray unbalanced brackets) one way or the
  other, depending on its version; there ours reads the edit, and the test checks that this is one of the
  grammar's own derivations;
* the pipeline: the context every UNet call gets is compared with the texts encoded on their own.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from sd_cli.pipeline.prompt_schedule import MAX_DEPTH, entry_at, has_editing, schedule

DOCUMENTED = [  # (prompt, A1111's schedule at 10 steps)
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    # (A1111 also lists "a [{b|d{:.5] c", marked "not handling this right now": its grammar cannot read a
    # "|" there, so the whole text stays plain in A1111 as here; test_equals_a1111_parser covers such texts.)
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
]


@pytest.mark.parametrize("prompt, expected", DOCUMENTED)
def test_a1111_documented_schedules(prompt, expected):
    assert schedule(prompt, 10) == tuple(expected)


def test_a1111_documented_long_example():
    text = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
            "[ in background:0.25] [shoddy:masterful:0.5]")
    assert schedule(text, 100) == (
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"))


def test_hires_timeline():
    """In a hires pass after 10 first-pass steps: a fraction counts from 1 ("1.5": half the hires pass), a
    step number from the first pass's steps (A1111's documented examples and rule)."""
    assert schedule("a [b:.5] c", 10, 10) == ((10, "a b c"),)
    assert schedule("a [b:1.5] c", 10, 10) == ((5, "a  c"), (10, "a b c"))
    assert schedule("[x:y:14]", 10, 10) == ((4, "x"), (10, "y"))
    assert schedule("[x:y:7]", 10, 10) == ((10, "y"),)  # over before the hires pass


def test_entry_at_counts_calls_from_zero():
    """A1111's denoiser counts its calls from 0 and takes the first entry whose last step is >= that
    count; past the end, the first entry."""
    ends = (3, 10)
    assert [entry_at(ends, c) for c in range(12)] == [0] * 4 + [1] * 7 + [0]


# --- A1111's own parser as the reference --------------------------------------------------------

GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


def _reference(lark):
    resolve = lark.Lark(GRAMMAR)
    explicit = lark.Lark(GRAMMAR, ambiguity="explicit")

    def when(token, steps, base):
        v = float(token)
        offset_f, offset_i = (0.0, 0) if base is None else (1.0, base)
        v = (v - offset_f) * steps if "." in token else v - offset_i
        return min(steps, int(v))

    def text(node, step, steps, base):
        if node is None:
            return ""
        if isinstance(node, lark.Token):
            return str(node)
        if node.data == "scheduled":  # [before, after, space, NUMBER, space]
            before, after, number = node.children[0], node.children[1], node.children[3]
            return text(before if step <= when(number, steps, base) else after, step, steps, base)
        if node.data == "alternate":
            return text(node.children[(step - 1) % len(node.children)], step, steps, base)
        return "".join(text(c, step, steps, base) for c in node.children)

    def of_tree(tree, prompt, steps, base):
        found = {steps}
        for sub in tree.iter_subtrees():
            if sub.data == "scheduled":
                w = when(sub.children[3], steps, base)
                if w >= 1:
                    found.add(w)
            elif sub.data == "alternate":
                found.update(range(1, steps + 1))
        return tuple((s, text(tree, s, steps, base)) for s in sorted(found))

    def derivations(node):
        if not isinstance(node, lark.Tree):
            yield node
        elif node.data == "_ambig":
            for child in node.children:
                yield from derivations(child)
        else:
            for kids in itertools.product(*[list(derivations(c)) for c in node.children]):
                yield lark.Tree(node.data, list(kids))

    def ref(prompt, steps, base, every=True):
        try:
            tree = resolve.parse(prompt)
        except lark.exceptions.LarkError:
            return ((steps, prompt),), None
        alternatives = {of_tree(t, prompt, steps, base)  # (every derivation: only for short texts)
                        for t in itertools.islice(derivations(explicit.parse(prompt)), 4000)} if every else None
        return of_tree(tree, prompt, steps, base), alternatives

    return ref


def test_equals_a1111_parser_on_bracket_soup():
    lark = pytest.importorskip("lark")
    ref = _reference(lark)
    rng = random.Random(1)
    alphabet = list("[]():|ab ,\\") + ["3", ".5", "1e1", "-1", "0", " BREAK "]
    ambiguous = 0
    n = 1500
    for _ in range(n):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        steps, base = rng.choice([1, 5, 10]), rng.choice([None, None, 4])
        want, alternatives = ref(prompt, steps, base)
        got = schedule(prompt, steps, base)
        if got != want:  # only where the grammar itself allows our reading
            assert alternatives is not None and got in alternatives, (prompt, steps, base, got, want)
            ambiguous += 1
    assert ambiguous < n // 50, ambiguous


def test_realistic_prompts_equal_a1111_parser():
    lark = pytest.importorskip("lark")
    ref = _reference(lark)
    for prompt in ("((masterpiece, [dog:cat:10])), best quality", "(([a:b:3]))", "[(a:1.2):(b:1.3):0.5]",
                   "a [red:blue:0.3] car, [[sunny|rainy]] day, (detailed:1.2), [ugly::5]",
                   "portrait \\[not an edit:3\\] [of a:of the:2] man", "[a:b:1e1] [c:d:+2] [e:f:-1]",
                   "x [a:b:3]()()", "[[a:b:3]]", "(x [a|b|c]:1.1)"):
        for steps, base in ((20, None), (30, None), (10, 20)):
            assert schedule(prompt, steps, base) == ref(prompt, steps, base, every=False)[0], prompt


def test_parser_never_fails():
    """Random soup, deep nesting, huge numbers and long texts: a schedule ending at `steps`, with rising
    steps, never an exception."""
    rng = random.Random(7)
    alphabet = list("[]():|\\ab ") + ["1e999", "-1e999", "0.", ".0", "99999999999999999999", "\n", "\\\n"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(2000)]
    texts += ["[" * 5000 + "a:b:3" + "]" * 5000, "(" * 3000, "[a|" * 3000, "[a:b:1e999]", "\\",
              "[a:b:3] " * 3000, "[x|y] " * 2000]
    for text in texts:
        for steps, base in ((7, None), (3, 12)):
            plan = schedule(text, steps, base)
            ends = [end for end, _ in plan]
            assert ends[-1] == steps and ends == sorted(set(ends)) and ends[0] >= 1
            assert all(isinstance(t, str) for _, t in plan)
    assert schedule("[a:b:1e999]", 7) == ((7, "a"),)  # past the end: A1111 would fail on the overflow
    assert schedule("[" * (MAX_DEPTH + 5) + "a:b:3" + "]" * (MAX_DEPTH + 5), 7)[0][0] == 7  # too deep: plain


def test_has_editing():
    assert has_editing("[a:b:3]") and has_editing("[a|b]") and has_editing("[a:b:0]")
    assert not has_editing("[a:b]") and not has_editing("(a:1.2) [b]") and not has_editing("a | [b:3]")


# --- the pipeline: which context each UNet call gets -------------------------------------------------


@pytest.fixture(scope="module")
def pipe(micro):
    from sd_cli import StableDiffusion

    return StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), dtype="fp32",
                                threads=1).pipeline()


def _record(pipe, monkeypatch):
    """Every UNet call's context rows (N, 77 k, D) in order."""
    seen = []
    unet = pipe.model.unet

    def recording(x, t, c):
        seen.append(c.detach().clone())
        return unet(x, t, c)

    monkeypatch.setattr(type(pipe), "_unet", lambda self, noise, concat: recording)
    return seen


def _run(pipe, prompts, sampler, steps, scale=1.0, negative="", **kw):
    g = torch.Generator().manual_seed(5)
    noise = torch.randn((len(prompts), 4, 8, 8), generator=g)
    return pipe.latents(prompts, noise, sampler=sampler, steps=steps, scale=scale, negative_prompt=negative,
                        generator=g, prompt_syntax="a1111", **kw)


def _encoded(pipe, texts):
    return pipe._encode(texts, "prompt", "a1111")  # (E, 77 k, D), padded together as the pipeline does


def test_each_call_gets_its_steps_text(pipe, monkeypatch):
    seen = _record(pipe, monkeypatch)
    _run(pipe, ["a [cat:dog:3] on a hill"], "euler", 6)
    cat, dog = _encoded(pipe, ["a cat on a hill", "a dog on a hill"])
    assert len(seen) == 6
    assert all(torch.equal(c[0], cat) for c in seen[:4]) and all(torch.equal(c[0], dog) for c in seen[4:])


def test_second_order_samplers_count_doubled_steps(pipe, monkeypatch):
    """Heun, 4 steps: A1111 schedules over 8 (second order), its denoiser counts the 7 calls; 0.5 -> step
    4: calls 0-4 take the first text."""
    seen = _record(pipe, monkeypatch)
    _run(pipe, ["[cat:dog:0.5]"], "heun", 4)
    cat, dog = _encoded(pipe, ["cat", "dog"])
    assert [torch.equal(c[0], cat) for c in seen] == [True] * 5 + [False] * 2
    assert torch.equal(seen[-1][0], dog)


def test_alternation_follows_a1111_call_count(pipe, monkeypatch):
    """[cat|dog] has entries (1, cat), (2, dog), (3, cat), ...; calls counted from 0 give cat, cat, dog,
    cat, dog (A1111's own sequence)."""
    seen = _record(pipe, monkeypatch)
    _run(pipe, ["[cat|dog]"], "euler", 5)
    cat, dog = _encoded(pipe, ["cat", "dog"])
    assert [("cat" if torch.equal(c[0], cat) else "dog" if torch.equal(c[0], dog) else "?") for c in seen] \
        == ["cat", "cat", "dog", "cat", "dog"]


def test_negative_prompt_and_batch_rows(pipe, monkeypatch):
    """The negative prompt has its own schedule; in a batch each prompt follows its own."""
    seen = _record(pipe, monkeypatch)
    _run(pipe, ["[cat:dog:1]", "a bird"], "euler", 3, scale=7.0, negative="[blurry:sharp:2]")
    texts = ["cat", "dog", "a bird"]
    enc = _encoded(pipe, texts)
    neg = pipe._encode(["blurry", "sharp"], "negative prompt", "a1111")
    for call, c in enumerate(seen):  # rows: [uncond x2; cond x2]
        assert torch.equal(c[0], neg[0 if call <= 2 else 1]) and torch.equal(c[1], c[0])
        assert torch.equal(c[2], enc[0 if call <= 1 else 1]) and torch.equal(c[3], enc[2])


def test_long_texts_are_padded_together(pipe, monkeypatch):
    """A schedule's texts are encoded together, so a short one is padded to the long one's chunks (as
    A1111 encodes one prompt's schedule in one batch)."""
    seen = _record(pipe, monkeypatch)
    long = ", ".join(["a red house"] * 30)
    _run(pipe, [f"[{long}:cat:1]"], "euler", 3)
    assert {c.shape[1] for c in seen} == {77 * 2}
    assert torch.equal(seen[-1][0], _encoded(pipe, [long, "cat"])[1])


def test_no_editing_is_unchanged(pipe, monkeypatch):
    """Off (images made before editing) or without brackets: the context of the whole text."""
    seen = _record(pipe, monkeypatch)
    _run(pipe, ["[[a]:3] house"], "euler", 3, prompt_steps=None)
    _run(pipe, ["a (house:1.2)"], "euler", 3)
    assert all(torch.equal(c[0], _encoded(pipe, ["[[a]:3] house"])[0]) for c in seen[:3])
    assert all(torch.equal(c[0], _encoded(pipe, ["a (house:1.2)"])[0]) for c in seen[3:])


def test_too_many_texts_is_one_error(pipe, monkeypatch):
    from sd_cli.errors import UsageError
    from sd_cli.pipeline import conditioning

    monkeypatch.setattr(conditioning, "MAX_EDIT_CHUNKS", 3)
    with pytest.raises(UsageError, match="different texts"):
        _run(pipe, ["[a|b|c|d]"], "euler", 4)


def test_hires_pass_uses_the_hires_timeline(micro, monkeypatch):
    """[cat:dog:1.5] with a hires pass: the first pass is all cat (1.5 is past its end); the hires pass
    switches half way through its own steps (A1111's hires timeline)."""
    from sd_cli import StableDiffusion
    from sd_cli.pipeline.generate import Pipeline
    from sd_cli.run.settings import Generation

    sd = StableDiffusion.load(micro["safetensors"], config=str(micro["config"]), dtype="fp32", threads=1)
    seen = _record(sd.pipeline(), monkeypatch)
    gen = Generation(("[cat:dog:1.5]",), sampler="euler", steps=4, scale=1.0, height=64, width=64, hr_scale=1.5,
                     hr_steps=6, hr_strength=0.5, watermark=False)
    sd.render(gen, sd.plan(gen)[0])
    cat, dog = sd.pipeline()._encode(["cat", "dog"], "prompt", "a1111")
    assert isinstance(sd.pipeline(), Pipeline) and len(seen) == 4 + 6
    assert [torch.equal(c[0], cat) for c in seen] == [True] * 4 + [True] * 4 + [False] * 2
    assert torch.equal(seen[-1][0], dog)


# --- the CLI: metadata, replay, refusals ---------------------------------------------------------------


def test_cli_records_editing_and_replays(tmp_path, capsys):
    import json

    from PIL import Image

    from sd_cli.cli import main

    out = tmp_path / "o"
    argv = ["--prompt", "a [red:blue:0.5] circle on a [green|white] background", "--outdir", str(out),
            "--n_samples", "1", "--skip_grid", "-q", "--threads", "1", "--steps", "6"]
    assert main(argv) == 0
    path = out / "samples" / "00000.png"
    with Image.open(path) as im:
        record = json.loads(im.info["sd_cli"])
    assert record["prompt_editing"] is True and record["token_count"] == 7  # the longest of its texts
    assert main(["--replay", str(path), "-q"]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["--prompt", "a circle AND a square", "--outdir", str(tmp_path / "p"), "-q"]) == 2
    assert "AND" in capsys.readouterr().err


def test_images_from_before_editing_replay(tmp_path, capsys):
    """An image made before prompt editing existed (no prompt_editing in its record) had its brackets read
    as emphasis; --replay makes it again so, pixel for pixel."""
    from sd_cli import StableDiffusion, save_images
    from sd_cli.cli import main

    sd = StableDiffusion.load()  # the demo model
    old = sd.txt2img("a [[red]:3] circle on a blue background", seed=3, steps=5, prompt_editing=False)
    path = save_images(old, tmp_path)[0]
    assert "prompt_editing" not in old[0].info["sd_cli"]
    new = sd.txt2img("a [[red]:3] circle on a blue background", seed=3, steps=5)
    assert '"prompt_editing": true' in new[0].info["sd_cli"] and new[0].tobytes() != old[0].tobytes()
    assert main(["--replay", str(path), "-q"]) == 0
    assert "identical" in capsys.readouterr().out
