"""The work plan: which batches a run makes, in which order, with which seed and metadata.

One place builds the work items for the CLI, torchrun, --resume and the Python API. Item j is one batch
of the one-process loop: iteration n, batch b, j = n * (batches per iteration) + b. Seeds (seed rule
"image", A1111's): image m of the run gets seed + m, its own generator and noise, so any image can be made
again alone with --seed S --n_samples 1; --fixed_code gives every batch the first batch's seeds. Rule
"batch" (images before it): batch j gets seed + j, one generator for the batch (seed with --fixed_code).
Every executor computes the same noise for an item. A --from-file
run batches its prompts n_samples at a time (the last batch may be smaller, and a change of LoRA tags
starts a new batch); a single prompt fills a batch of n_samples. Items are built when asked for (`WorkPlan[j]`), never all at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sd_cli.run.settings import Generation


@dataclass(frozen=True)
class WorkItem:
    """One batch: its prompts, seed, and each image's metadata (what its PNG records)."""

    index: int  # j: position in the one-process order
    iteration: int
    prompts: tuple[str, ...]
    seed: int  # the batch's seed (seed rule "batch"), or its first image's
    metas: tuple[dict, ...]
    seeds: tuple[int, ...] = ()  # seed rule "image": each image's own seed


def batches(gen: Generation) -> list[tuple[str, ...]]:
    """The batches of one iteration (`Generation.batches`)."""
    return gen.batches()


class WorkPlan(Sequence):
    """The run's work items in one-process order, built lazily from the settings and base metadata."""

    def __init__(self, gen: Generation, base: dict, describe=None):
        """`describe(prompt) -> dict`: per-prompt metadata (token count, embeddings); default: token count."""
        self.gen, self.base = gen, base
        self.batches = batches(gen)
        self._fields: dict[str, dict] = {}
        self._describer = describe

    def _describe(self, prompt: str) -> dict:
        if prompt not in self._fields:
            if self._describer is not None:
                self._fields[prompt] = self._describer(prompt)
            else:
                from sd_cli.pipeline.conditioning import token_count

                self._fields[prompt] = {"token_count": token_count(prompt, self.gen.prompt_syntax)}
        return self._fields[prompt]

    def __len__(self) -> int:
        return self.gen.n_iter * len(self.batches)

    def __getitem__(self, j: int) -> WorkItem:  # type: ignore[override]
        if not 0 <= j < len(self):
            raise IndexError(j)
        gen = self.gen
        n, b = divmod(j, len(self.batches))
        prompts = self.batches[b]
        if gen.seed_rule == "image":
            first = gen.seed + (0 if gen.fixed_code else self._images_before(n, b))
            seeds = tuple(first + i for i in range(len(prompts)))
        else:
            seeds = (gen.seed + (0 if gen.fixed_code else j),) * len(prompts)
        metas = tuple(image_metadata(self.base, prompt, seeds[i], len(prompts), i, gen.n_samples, n,
                                     gen.watermarked, self._describe(prompt))
                      for i, prompt in enumerate(prompts))
        return WorkItem(j, n, prompts, seeds[0], metas, seeds if gen.seed_rule == "image" else ())

    def _images_before(self, n: int, b: int) -> int:
        """Images of the run before batch b of iteration n (A1111 counts seeds over the whole run)."""
        per_iter = sum(len(batch) for batch in self.batches)
        return n * per_iter + sum(len(batch) for batch in self.batches[:b])


def image_metadata(base: dict, prompt: str, seed: int, batch_size: int, batch_index: int, n_samples: int,
                   iteration: int, watermark: bool, prompt_fields: dict) -> dict:
    """One image's sd_cli metadata: the run's shared fields, then the image's own (what its PNG records
    and what --replay expects to find)."""
    return {**base, "prompt": prompt, "seed": seed, "batch_size": batch_size, "batch_index": batch_index,
            "n_samples": n_samples, "iteration": iteration, "watermark": watermark, **prompt_fields}


def grid_metadata(gen: Generation, base: dict, watermarked: bool) -> dict:
    """The sd_cli metadata of the run's grid."""
    prompts = list(gen.prompts)
    return {**base, "prompt": prompts[0] if len(prompts) == 1 else prompts, "seed": gen.seed,
            "n_iter": gen.n_iter, "n_samples": gen.n_samples, "grid": True, "watermark": watermarked}
