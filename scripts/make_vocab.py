#!/usr/bin/env python3
"""Rebuild ``sd_cli/data/clip_bpe_merges.txt``, the CLIP BPE merge list shipped with sd_cli.

Source
------
OpenAI's CLIP tokenizer data ``bpe_simple_vocab_16e6.txt.gz`` as carried inside the PyPI
wheel of

* package: ``open_clip_torch``, version ``3.3.0`` (``open_clip_torch-3.3.0-py3-none-any.whl``)
* member:  ``open_clip/bpe_simple_vocab_16e6.txt.gz``
* sha256 of that member (the .gz, 1,356,917 bytes):
  ``924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a``
  (the same file OpenAI's CLIP repository ships; its decompressed text, 3,194,984 bytes,
  has sha256 ``67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8``)

Output
------
Only what the Stable Diffusion v1 text encoder (openai/clip-vit-large-patch14, vocabulary of
49408 ids) uses: a header line ``#version: 0.2`` followed by the first 48894 merges
(49152 - 256 - 2) of the file, i.e. its lines 1 .. 48894, one ``left right`` pair per line,
``\\n`` line ends, UTF-8. That is the layout of a Hugging Face ``merges.txt``. The token ids
are derived from it by ``sd_cli.tokenizer`` (256 byte symbols, the same with ``</w>``, one id
per merge, then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407).

* size: 524,619 bytes
* sha256: ``9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a``
  (pinned as ``OUTPUT_SHA256``, checked before writing)

The output is plain text (not re-gzipped), so its bytes do not depend on a zlib version:
running the script twice gives identical bytes.

Usage
-----
    python scripts/make_vocab.py            # download the wheel with pip, write the file
    python scripts/make_vocab.py --wheel open_clip_torch-3.3.0-py3-none-any.whl
    python scripts/make_vocab.py --check    # only verify the shipped file, write nothing

The download is ``python -m pip download --no-deps --only-binary=:all: open_clip_torch==3.3.0``
into a temporary folder; nothing is installed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "open_clip_torch"
VERSION = "3.3.0"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MEMBER_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

N_MERGES = 49152 - 256 - 2  # = 48894, what CLIP's 49408-entry vocabulary uses
HEADER = "#version: 0.2"
OUTPUT_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT = REPO_ROOT / "sd_cli" / "data" / "clip_bpe_merges.txt"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_wheel(dest: Path) -> Path:
    """Fetch the pinned wheel with pip (no dependencies, no build) and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", f"{PACKAGE}=={VERSION}", "-d", str(dest),
    ]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob(f"{PACKAGE}-{VERSION}-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one {PACKAGE}-{VERSION} wheel in {dest}, found {wheels}")
    return wheels[0]


def read_member(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(MEMBER)
    got = sha256(data)
    if got != MEMBER_SHA256:
        raise SystemExit(f"{wheel.name}:{MEMBER}: sha256 {got}, expected {MEMBER_SHA256}")
    return data


def build_output(gz_bytes: bytes) -> bytes:
    """The first N_MERGES merges of the BPE file, in merges.txt layout."""
    lines = gzip.decompress(gz_bytes).decode("utf-8").split("\n")
    merges = lines[1 : 1 + N_MERGES]
    if len(merges) != N_MERGES:
        raise SystemExit(f"BPE file has only {len(merges)} merges, need {N_MERGES}")
    for i, line in enumerate(merges, start=1):
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise SystemExit(f"BPE file line {i} is not a 'left right' pair: {line!r}")
    return (HEADER + "\n" + "\n".join(merges) + "\n").encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--wheel", type=Path, help="use this already downloaded wheel instead of pip")
    ap.add_argument("--check", action="store_true",
                    help="only verify that the shipped file has the pinned sha256")
    ap.add_argument("--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT}")
    args = ap.parse_args(argv)

    if args.check:
        got = sha256(args.output.read_bytes())
        ok = got == OUTPUT_SHA256
        print(f"{args.output}: sha256 {got} {'OK' if ok else 'MISMATCH, expected ' + OUTPUT_SHA256}")
        return 0 if ok else 1

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel if args.wheel else download_wheel(Path(tmp))
        out = build_output(read_member(wheel))

    got = sha256(out)
    if got != OUTPUT_SHA256:
        raise SystemExit(f"derived file sha256 {got}, expected {OUTPUT_SHA256}; not written")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(out)
    print(f"wrote {args.output} ({len(out)} bytes, sha256 {got})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
