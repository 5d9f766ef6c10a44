"""download, grayscale and filter give the same bytes on every machine (issue 21, item 7).

The data stages' outputs are what a DVC remote and the run cache share between machines,
so they must be bit-identical: no BLAS, no sum whose order the CPU or a thread count
decides. These constants were computed once; a machine, a library version or a change in
the code that gives other bytes fails here. If a change to the data stages is meant to
change their outputs, update the constants in the same commit and say so.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

CASES = {
    # gray, a bank of two sizes (FFT for the smiley, tap by tap for sobel_x), noise
    "gray bank": {
        "kernel": ["smiley", "sobel_x"],
        "data": {"count": 6, "size": 48, "val_fraction": 0.25},
        "filter": {"noise_std": 0.01},
    },
    # colour, rescale 2 (the fine images, their area means), same padding
    "colour rescale": {
        "kernel": ["red", "green"],
        "data": {"count": 6, "size": 40, "val_fraction": 0.25, "channels": 3},
        "filter": {"rescale": 2, "padding": "same"},
    },
}

EXPECTED = {
    "colour rescale": {
        "data/raw/images/leaves_00000.png": (
            "2332d607fbc2083c2e5921e8506e01b8727704f05a0187f82285abedadbdc50c"
        ),
        "data/raw/images/leaves_00001.png": (
            "cfbe3b9ffaf9fb5f5505c33abb02cd3f2cad19499a0dcff3d492b4709a04312b"
        ),
        "data/raw/images/leaves_00002.png": (
            "5e88a299640eb3e336bbea56f78a171456d9be87706735e0a49bc8f8b3b33125"
        ),
        "data/raw/images/leaves_00003.png": (
            "3ca46e4423066bc4188a133f72e2b2b79ca3045bac8e4af24fad5cd519781924"
        ),
        "data/raw/images/leaves_00004.png": (
            "1ff91c304e5cd2cd2c2445e651adb0b4dcfabfba56b9e574a505b293df40952c"
        ),
        "data/raw/images/leaves_00005.png": (
            "73c79d6e5fa14866f9e132b753fe0e219db9387cffc670fe5776b0c59f4f660b"
        ),
        "data/raw/manifest.csv": (
            "4243abb641ec604dd36c6e2678b9d438e333838ddea21744074121b5c3ac8441"
        ),
        "data/gray/images.npy": (
            "8853256151a4353236874cd76bd50f6ecb09f9a0b81495e92d2a35164b8250b4"
        ),
        "data/gray/index.csv": ("4243abb641ec604dd36c6e2678b9d438e333838ddea21744074121b5c3ac8441"),
        "data/filtered/filter.json": (
            "db39a68bf809fd085a8bce4e8741eec3e4fd0cfd7551687b1b5718289d7f4f80"
        ),
        "data/filtered/inputs.npy": (
            "c0c5e9d339273cfd8ae3bb2519d2090c82a467e45a904b052970062a30ecd95b"
        ),
        "data/filtered/kernel.npy": (
            "356916763f731d7a818fa3763cae5e5873f2d5cbba6c6795661f7c48bca8cc4c"
        ),
        "data/filtered/targets.npy": (
            "f1e9483a1d61293d65812d56a776abd5f940be9a3c95d0775653d3dcd20a2180"
        ),
    },
    "gray bank": {
        "data/raw/images/leaves_00000.png": (
            "2332d607fbc2083c2e5921e8506e01b8727704f05a0187f82285abedadbdc50c"
        ),
        "data/raw/images/leaves_00001.png": (
            "cfbe3b9ffaf9fb5f5505c33abb02cd3f2cad19499a0dcff3d492b4709a04312b"
        ),
        "data/raw/images/leaves_00002.png": (
            "5e88a299640eb3e336bbea56f78a171456d9be87706735e0a49bc8f8b3b33125"
        ),
        "data/raw/images/leaves_00003.png": (
            "3ca46e4423066bc4188a133f72e2b2b79ca3045bac8e4af24fad5cd519781924"
        ),
        "data/raw/images/leaves_00004.png": (
            "1ff91c304e5cd2cd2c2445e651adb0b4dcfabfba56b9e574a505b293df40952c"
        ),
        "data/raw/images/leaves_00005.png": (
            "73c79d6e5fa14866f9e132b753fe0e219db9387cffc670fe5776b0c59f4f660b"
        ),
        "data/raw/manifest.csv": (
            "4243abb641ec604dd36c6e2678b9d438e333838ddea21744074121b5c3ac8441"
        ),
        "data/gray/images.npy": (
            "492967bb74381ca68ccf8d6781167d8ab3ca573847ade8bbeebd6a71694a6777"
        ),
        "data/gray/index.csv": ("4243abb641ec604dd36c6e2678b9d438e333838ddea21744074121b5c3ac8441"),
        "data/filtered/filter.json": (
            "12b1d79ebfd6e9b23d0a94e4eff14767c3dea86afa252b4bb53b8a96115bcd6c"
        ),
        "data/filtered/kernel.npy": (
            "1e4cdd18ca977ce611ef1c71b7c024d53afe42f426beaea780c0c079d5da5731"
        ),
        "data/filtered/targets.npy": (
            "23e9615d4986869230f7690d3db24918d1ae870b724c831c3945a305a31f48f4"
        ),
    },
}


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file the three stages wrote, by path under root."""
    found = {}
    for folder in ("data/raw", "data/gray", "data/filtered"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                found[path.relative_to(root).as_posix()] = hashlib.sha256(
                    path.read_bytes()
                ).hexdigest()
    return found


def run_data_stages(root: Path, params: dict, **env_changes: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_changes}
    for stage in ("download", "grayscale", "filter"):
        result = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{stage} exited {result.returncode}:\n{result.stderr}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_data_stages_give_the_same_bytes_on_every_machine(tmp_path, case):
    run_data_stages(tmp_path, CASES[case])
    found = digests(tmp_path)
    if not EXPECTED[case]:
        pytest.fail(f"no constants for {case!r}: {found!r}")
    assert found == EXPECTED[case]


# numpy picks SIMD code for exp, log, power and tanh by the CPU it runs on, and OpenBLAS
# its kernels, and their last bits differ. This runs numpy without its AVX2 and AVX-512
# code and OpenBLAS with its kernels for an older CPU, as on another machine. The
# `image @ LUMA_WEIGHTS` of earlier versions gave another data/gray here (issue 21, item 7).
OLDER_CPU = {
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Sandybridge",
}


def test_the_data_stages_do_not_depend_on_the_cpus_instruction_set(tmp_path):
    params = {
        "kernel": ["gaussian", "sobel_x"],
        "kernels": {"gaussian": {"size": 9, "covariance": [[4.0, 1.5], [1.5, 2.0]]}},
        "data": {"count": 12, "size": 96, "val_fraction": 0.25},
        "filter": {"noise_std": 0.001, "activation": "tanh"},
    }
    run_data_stages(tmp_path / "here", params)
    run_data_stages(tmp_path / "older", params, **OLDER_CPU)
    assert digests(tmp_path / "here") == digests(tmp_path / "older")
