"""`torchrun -m moecompose train`: FSDP2 over gloo on CPU follows one process, and
Distributed Checkpoints resume on another number of processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import SPECS, changed, weights, write_recipe

import moecompose

pytestmark = pytest.mark.slow

EXTRA = "grad_accumulation: 2\ncheckpoint: {every: 2}\neval: {every: 2, max_tokens: 512}\n"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return moecompose.build(SPECS / "sparse_upcycling.yaml",
                            tmp_path_factory.mktemp("dist") / "moe").path


def torchrun(recipe: Path, out: Path, *args: str, nproc: int = 2, wait: bool = True
             ) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "moecompose", "train", str(recipe), "-o", str(out), "-q", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    if wait:
        _stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr.decode()[-3000:]
    return proc


def log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in log(run_dir) if e["event"] == "train"]


def test_two_processes_follow_one(artifact: Path, tmp_path: Path) -> None:
    one = moecompose.train(write_recipe(tmp_path, artifact, EXTRA, steps=4, name="one.yaml"),
                           tmp_path / "one")
    recipe = write_recipe(tmp_path, artifact, EXTRA, steps=4, name="two.yaml")
    torchrun(recipe, tmp_path / "two")
    a, b = losses(one.run_dir), losses(tmp_path / "two.run")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x)
    wa, wb = weights(one.artifact.path), weights(tmp_path / "two")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5)
    assert changed(wa, weights(artifact))  # it trained
    # Each of 2 ranks holds at most 0.6x of what one process holds (parameters,
    # gradients, optimizer state).
    first = next(e for e in log(tmp_path / "two.run") if e["event"] == "train")
    alone = next(e for e in log(one.run_dir) if e["event"] == "train")
    assert first["state_bytes_per_rank"] <= 0.6 * alone["state_bytes_per_rank"]


def test_killed_run_resumes_on_another_number_of_processes(artifact: Path, tmp_path: Path) -> None:
    whole = moecompose.train(write_recipe(tmp_path, artifact, EXTRA, steps=12, name="a.yaml"),
                             tmp_path / "whole")
    recipe = write_recipe(tmp_path, artifact, EXTRA, steps=12, name="b.yaml")
    out = tmp_path / "killed"
    proc = torchrun(recipe, out, wait=False)
    first = tmp_path / "killed.run" / "checkpoints" / "step-000002"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for member in family:  # kill -9 the launcher and every worker at once
        member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=60)
    proc.wait()
    assert not out.exists()
    resumed = moecompose.train(recipe, out, resume=True)  # one process now
    wa, wb = weights(whole.artifact.path), weights(resumed.artifact.path)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5)
    steps = [e["step"] for e in log(resumed.run_dir) if e["event"] == "train"]
    assert steps == list(range(1, 13))


def test_grad_accumulation_must_split_over_the_processes(artifact: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, artifact, "grad_accumulation: 1\n", steps=1)
    proc = torchrun(recipe, tmp_path / "o", wait=False)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "grad_accumulation 1 is not a multiple of the 2 processes" in stderr.decode()
