"""Both install kinds find the shipped configs from any folder (issue 13 item 1): a wheel in a fresh venv,
and an editable install (the README's `pip install -e .`), each run from an unrelated folder.

Before the fix the configs were mapped in from configs/stable-diffusion by setuptools' package-dir, which
an editable install does not follow: `sd-txt2img --ckpt /abs/model.safetensors` said "config file ...
not found" instead of getting on with the checkpoint. Each venv sees the test environment's packages
(torch, ...) and installs only sd-cli itself, with no download.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _venv(where: Path) -> Path:
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(where)
    return where / "bin"


def _pip(bin_dir: Path, *args: str) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    cmd = [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def _check_runs_from_anywhere(bin_dir: Path, elsewhere: Path, expect_under: Path) -> None:
    elsewhere.mkdir()
    where = subprocess.run([str(bin_dir / "python"), "-c", "import sd_cli; print(sd_cli.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(expect_under), where.stdout + where.stderr
    missing = elsewhere / "nowhere" / "model.safetensors"
    r = subprocess.run([str(bin_dir / "sd-txt2img"), "--ckpt", str(missing), "-q"], cwd=elsewhere,
                       capture_output=True, text=True, timeout=300)
    # The default config (configs/stable-diffusion/v1-inference.yaml) resolved to the packaged copy, so the
    # run got as far as the checkpoint:
    assert r.returncode == 1 and r.stderr.startswith(f"sd-txt2img: error: no checkpoint at {missing}"), r.stderr
    for name in ("v1-inference.yaml", "v1-inference-cpu.yaml"):
        r = subprocess.run([str(bin_dir / "sd-txt2img"), "--ckpt", str(missing), "--config",
                            f"configs/stable-diffusion/{name}", "-q"], cwd=elsewhere, capture_output=True, text=True,
                           timeout=300)
        assert "no checkpoint at" in r.stderr, r.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="venv layout")
def test_wheel_install_finds_its_configs_from_any_folder(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    [wheel] = wheels.glob("sd_cli-*.whl")
    bin_dir = _venv(tmp_path / "venv")
    _pip(bin_dir, str(wheel))
    _check_runs_from_anywhere(bin_dir, tmp_path / "elsewhere", tmp_path / "venv")


@pytest.mark.skipif(sys.platform == "win32", reason="venv layout")
def test_editable_install_finds_its_configs_from_any_folder(tmp_path):
    bin_dir = _venv(tmp_path / "venv")
    _pip(bin_dir, "-e", str(ROOT))
    _check_runs_from_anywhere(bin_dir, tmp_path / "elsewhere", ROOT)
