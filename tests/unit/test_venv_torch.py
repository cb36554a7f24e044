"""`venv create` picks the CUDA build of torch the NVIDIA driver supports (NVML's reading, faked here: this
machine has no GPU); `venv check` warns when an NVIDIA GPU meets a CPU torch; the build is read from the
worker venv's torch/version.py without starting it."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lab_attendant import venv
from lab_attendant.errors import UserError
from tests.conftest import EXPERIMENTAL_PYTHON


class FakeNVML:
    """The four pynvml calls driver_cuda_version makes; `version` as nvmlSystemGetCudaDriverVersion gives it."""

    def __init__(self, version: int = 12080, devices: int = 1, fail: bool = False) -> None:
        self.version, self.devices, self.fail = version, devices, fail
        self.shut = False

    def nvmlInit(self) -> None:
        if self.fail:
            raise OSError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return self.devices

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.version

    def nvmlShutdown(self) -> None:
        self.shut = True


def test_the_driver_cuda_version_as_nvml_reports_it():
    nvml = FakeNVML(12040)
    assert venv.driver_cuda_version(nvml) == (12, 4) and nvml.shut
    assert venv.driver_cuda_version(FakeNVML(13010)) == (13, 1)
    assert venv.driver_cuda_version(FakeNVML(devices=0)) is None
    assert venv.driver_cuda_version(FakeNVML(fail=True)) is None


@pytest.mark.parametrize(("driver", "tag"), [((13, 1), "cu130"), ((13, 0), "cu130"), ((12, 9), "cu128"),
                                             ((12, 8), "cu128"), ((12, 6), "cu126")])
def test_a_driver_gets_the_newest_cuda_build_it_supports(monkeypatch, driver, tag):
    monkeypatch.delenv(venv.TORCH_SPEC_ENV, raising=False)
    install = venv.torch_install(None, driver)
    assert install.args == (venv.DEFAULT_TORCH_SPEC, "--index-url", f"https://download.pytorch.org/whl/{tag}")
    assert f"CUDA {driver[0]}.{driver[1]}" in install.why


def test_a_given_spec_wins_and_no_gpu_keeps_the_default(monkeypatch):
    monkeypatch.delenv(venv.TORCH_SPEC_ENV, raising=False)
    given = "torch==2.6.0 --index-url https://download.pytorch.org/whl/cu118"
    assert venv.torch_install(given, (12, 8)).args == ("torch==2.6.0", "--index-url",
                                                       "https://download.pytorch.org/whl/cu118")
    assert venv.torch_install(None, None).args == (venv.DEFAULT_TORCH_SPEC,)
    monkeypatch.setenv(venv.TORCH_SPEC_ENV, "torch==2.7.1")
    assert venv.torch_install(None, (12, 8)).args == ("torch==2.7.1",)


def test_a_driver_older_than_every_cuda_build_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.delenv(venv.TORCH_SPEC_ENV, raising=False)
    with pytest.raises(UserError, match=r"supports CUDA 11\.8 .* need 12\.6 or later: update the driver, or give "
                                        r"--torch-spec"):
        venv.torch_install(None, (11, 8))


def _site_packages(tmp_path: Path, version_py: str | None) -> Path:
    site = tmp_path / "v" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    if version_py is not None:
        (site / "torch").mkdir()
        (site / "torch" / "version.py").write_text(version_py)
    return tmp_path / "v" / "bin" / "python"


def test_the_worker_torch_build_is_read_from_its_version_file(tmp_path):
    # torch writes these lines into torch/version.py at build time
    cpu = _site_packages(tmp_path / "a", "__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n")
    cuda = _site_packages(tmp_path / "b", "__version__ = '2.13.0+cu128'\ncuda: Optional[str] = '12.8'\n")
    assert venv.worker_torch_cuda(cpu) == "cpu"
    assert venv.worker_torch_cuda(cuda) == "12.8"
    assert venv.worker_torch_cuda(_site_packages(tmp_path / "c", None)) is None  # no torch: cannot tell


@pytest.mark.skipif(not EXPERIMENTAL_PYTHON.exists(), reason="no experimental venv (scripts/setup.sh makes it)")
def test_venv_check_warns_when_an_nvidia_gpu_meets_a_cpu_torch(capsys, monkeypatch):
    """The real experimental venv (a CPU torch here, else skipped) and an NVML that sees a CUDA 12.8 driver."""
    from lab_attendant.cli.model import cmd_venv

    if venv.worker_torch_cuda(EXPERIMENTAL_PYTHON) != "cpu":
        pytest.skip("the experimental venv holds a CUDA build of torch")
    venv_dir = EXPERIMENTAL_PYTHON.parent.parent
    info = venv.check(venv_dir, nvml=FakeNVML(12080))
    assert info["torch_cuda"] is None and info["driver_cuda"] == "12.8"
    assert info["warning"].startswith("NVIDIA GPU present, CPU torch in the worker venv")
    assert "lab-attendant venv create --force" in info["warning"]
    assert "warning" not in venv.check(venv_dir, nvml=FakeNVML(fail=True))  # no GPU: nothing to say

    class Cfg:
        class worker:
            python = str(EXPERIMENTAL_PYTHON)

    monkeypatch.setattr(venv, "driver_cuda_version", lambda nvml=None: (12, 8))
    assert cmd_venv(Cfg, argparse.Namespace(venv_cmd="check")) == 0  # a warning, not a failure
    err = capsys.readouterr().err
    assert err.startswith("lab-attendant: NVIDIA GPU present, CPU torch in the worker venv") and err.count("\n") == 1
