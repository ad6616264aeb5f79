"""The default install is TensorFlow's CPU-only build, so starting TensorFlow prints no CUDA errors.

TensorFlow 2.16's CUDA build (the `tensorflow` wheel, which the `gpu` extra installs as
`tensorflow[and-cuda]`) logs three "Unable to register cuDNN/cuFFT/cuBLAS factory" errors every
time it is imported, GPU or not. The default set (`make venv`, the `cpu` extra) installs
`tensorflow-cpu`, which has no CUDA code. This fails if the CUDA wheel comes back into the default
set: setup.cfg naming `tensorflow` again, or a dependency requiring it next to `tensorflow-cpu`.
It skips where the gpu extra was chosen on purpose: the CUDA wheels it brings (nvidia-cudnn-cu12)
are installed next to `tensorflow`.
"""

import importlib.metadata
import os
import subprocess
import sys

import pytest


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_importing_tensorflow_prints_no_cuda_registration_errors():
    cpu, full = _version("tensorflow-cpu"), _version("tensorflow")
    assert not (cpu and full), (
        f"tensorflow {full} and tensorflow-cpu {cpu} both installed: they write the same files; "
        "find what requires `tensorflow` (BUILD_NOTES.md), then `make clean-venv venv`"
    )
    if full and _version("nvidia-cudnn-cu12"):
        pytest.skip(f"the gpu extra is installed (tensorflow {full} and CUDA wheels): "
                    "the CUDA build logs 'Unable to register' on import by design")  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")  # everything a user sees by default
    code = "import tensorflow as tf; print(tf.test.is_built_with_cuda())"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    installed = f"tensorflow-cpu {cpu}" if cpu else f"tensorflow {full}"
    errors = [line for line in proc.stderr.splitlines() if "Unable to register" in line]
    assert not errors, f"{installed}:\n" + "\n".join(errors)
    assert proc.stdout.split()[-1] == "False", "the default TensorFlow is a CUDA build"
