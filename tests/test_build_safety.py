"""A build never loses data and never leaks disk: outputs that appear meanwhile, two builds
to one folder, kill -9 and SIGTERM mid-build, full disks. Real processes and signals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

import moecompose as mc
from moecompose import MoeComposeError
from moecompose.artifact import _host, output_lock, remove_stale, verify_files

pytestmark = pytest.mark.slow


@pytest.fixture
def spec(write_spec) -> Path:
    return write_spec(
        """
        moecompose: 1
        sources: {seed: $seed, code: $code}
        layers:
          - select: all
            ffn:
              experts: [seed, code]
        """
    )


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _one_error_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_failed_build_removes_the_folders_it_made_for_its_output(
    spec: Path, tmp_path: Path
) -> None:
    out = tmp_path / "new" / "deeper" / "model"

    def fail(done: int, total: int, name: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mc.build(spec, out, progress=fail)
    assert not (tmp_path / "new").exists()


def test_output_that_appears_during_the_build_is_left_alone(spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifacts" / "model"

    def appear(done: int, total: int, name: str) -> None:
        if not out.exists():
            out.mkdir()
            (out / "keep.txt").write_text("precious")

    with pytest.raises(MoeComposeError, match="appeared while the build ran") as info:
        mc.build(spec, out, progress=appear)
    assert "--force" in info.value.format()
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert _hidden(out.parent) == []


def test_force_replaces_only_an_artifact_that_appears(spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    mc.build(spec, tmp_path / "other")

    def foreign(done: int, total: int, name: str) -> None:
        if not out.exists():
            out.mkdir()
            (out / "notes.txt").write_text("mine")

    with pytest.raises(MoeComposeError, match="not a moecompose artifact"):
        mc.build(spec, out, force=True, progress=foreign)
    assert (out / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)

    def artifact(done: int, total: int, name: str) -> None:
        if not out.exists():
            shutil.copytree(tmp_path / "other", out)
            (out / "stale.txt").write_text("from the other build")

    mc.build(spec, out, force=True, progress=artifact)
    assert not (out / "stale.txt").exists() and verify_files(out) == []
    assert _hidden(tmp_path) == []


def test_a_second_build_to_a_locked_output_stops_at_once(spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    with output_lock(out):
        line = _one_error_line(_run("-m", "moecompose.cli", "build", str(spec), "-o", str(out),
                                    "-q"), 2)
    assert f"another build is writing {out} (pid {os.getpid()}" in line
    assert not out.exists() and _hidden(tmp_path) == []


def test_concurrent_builds_to_one_output_give_one_artifact(spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    command = [sys.executable, "-m", "moecompose.cli", "build", str(spec), "-o", str(out), "-q"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2, 2], results
    for code, stderr in results:
        if code == 2:
            assert stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr
            assert str(out) in stderr and "Traceback" not in stderr
    assert verify_files(out) == [] and _hidden(tmp_path) == []


KILL_MIDWAY = """
import os, signal, sys
import moecompose as mc
def stop(done, total, name):
    if done * 2 > total:
        os.kill(os.getpid(), signal.SIG{sig})
mc.build(sys.argv[1], sys.argv[2], progress=stop)
"""


def test_killed_build_leaves_a_folder_that_the_next_build_removes(spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    killed = _run("-c", KILL_MIDWAY.format(sig="KILL"), str(spec), str(out))
    assert killed.returncode == -9
    lock, partial = _hidden(tmp_path)  # a dead process's lock holds nothing
    assert lock == ".model.lock" and partial.startswith(".model.partial-"), (lock, partial)

    # temporary folders of live writers, and of other hosts, are not ours to remove
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    start = int(psutil.Process(writer.pid).create_time() * 1000)
    alive = tmp_path / f".model.partial-{_host()}-{writer.pid}-{start}"
    elsewhere = tmp_path / f".model.partial-{'0' * 8}-1-1"
    alive.mkdir()
    elsewhere.mkdir()
    try:
        mc.build(spec, out)
    finally:
        writer.kill()
    assert sorted(_hidden(tmp_path)) == sorted([alive.name, elsewhere.name])
    assert verify_files(out) == []


def test_half_swapped_replacement_puts_the_old_artifact_back(spec: Path, tmp_path: Path) -> None:
    """A writer killed between moving the old artifact aside and moving the new one in:
    the old one is restored, not deleted."""
    out = tmp_path / "model"
    mc.build(spec, out)
    aside = tmp_path / f".model.old-{_host()}-999999999-1"
    out.rename(aside)
    assert remove_stale(out) == [aside]
    assert verify_files(out) == [] and _hidden(tmp_path) == []


def test_sigterm_mid_build_cleans_up_and_exits_143(spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    script = textwrap.dedent("""
        import os, signal, sys
        from moecompose.build import executor
        from moecompose.cli import main
        real = executor.produce
        def produce(tensor, *args):
            if tensor.name.startswith("model.layers.1."):
                os.kill(os.getpid(), signal.SIGTERM)
            return real(tensor, *args)
        executor.produce = produce
        main(["build", sys.argv[1], "-o", sys.argv[2], "-q"])
    """)
    result = _run("-c", script, str(spec), str(out))
    assert result.returncode == 143, result.stderr
    assert result.stderr.startswith("terminated") and "Traceback" not in result.stderr
    assert not out.exists() and _hidden(tmp_path) == []


FILE_SIZE_LIMIT = """
import resource, signal, sys
from moecompose.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
main(["build", sys.argv[1], "-o", sys.argv[2], "-q"])
"""


def test_a_write_that_fails_for_lack_of_room_names_the_output(spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    line = _one_error_line(_run("-c", FILE_SIZE_LIMIT, str(spec), str(out)), 1)
    assert f"cannot write {out}: File too large" in line and "free some space" in line
    assert "failed to compute tensor" not in line
    assert not out.exists() and _hidden(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_too_small_for_the_plan_is_refused_before_writing(
    spec: Path, small_tmpfs: Path
) -> None:
    out = small_tmpfs / "model"
    line = _one_error_line(_run("-m", "moecompose.cli", "build", str(spec), "-o", str(out),
                                "-q"), 1)
    assert f"cannot write {out}: the artifact needs" in line and "free" in line
    assert list(small_tmpfs.iterdir()) == []


def test_manifest_source_hashes_are_remembered_until_the_file_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_spec) -> None:
    """A manifest lists every source file's sha256; a second build does not read the
    sources again for it, and a changed file (other mtime) is hashed anew."""
    import hashlib
    import json
    import os

    import moecompose
    from moecompose import artifact

    monkeypatch.setenv("MOECOMPOSE_CACHE_DIR", str(tmp_path / "cache"))
    hashed: list[Path] = []
    real = artifact.sha256_file
    monkeypatch.setattr(artifact, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    path = write_spec("""
        moecompose: 1
        sources: {seed: $seed}
        layers:
        - select: all
          ffn: {experts: {copy: seed, count: 2}}
    """)
    first = moecompose.build(path, tmp_path / "a").path
    source = next(p for p in hashed if p.name == "model.safetensors")
    assert source.parent.name == "seed"
    hashed.clear()
    moecompose.build(path, tmp_path / "b")
    assert not [p for p in hashed if p.parent == source.parent]
    listed = json.loads((first / "manifest.json").read_text())["sources"]["seed"]["files"]
    assert listed["model.safetensors"] == hashlib.sha256(source.read_bytes()).hexdigest()
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    hashed.clear()
    moecompose.build(path, tmp_path / "c", force=True)
    assert source in hashed


def test_sources_are_hashed_on_a_thread_of_their_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_spec) -> None:
    """The manifest's source hashes are computed alongside the build, not after it: a cold
    hash cache then costs a build little more than a warm one."""
    import threading

    from moecompose import artifact

    monkeypatch.setenv("MOECOMPOSE_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[tuple[str, Path]] = []
    real = artifact.sha256_file
    monkeypatch.setattr(artifact, "sha256_file", lambda p: calls.append(
        (threading.current_thread().name, Path(p))) or real(p))
    path = write_spec("moecompose: 1\nsources: {seed: $seed, code: $code}\n"
                      "layers:\n- select: all\n  ffn: {experts: [seed, code]}\n")
    from moecompose.build import executor

    real_produce = executor.produce

    def produce(tensor, *args):
        calls.append(("produce", Path(tensor.name)))
        return real_produce(tensor, *args)

    monkeypatch.setattr(executor, "produce", produce)
    mc.build(path, tmp_path / "a")
    sources = [(thread, p) for thread, p in calls
               if thread != "produce" and tmp_path not in p.parents]  # not outputs
    assert sorted(p.parent.name for _, p in sources) == ["code", "seed"]
    assert {thread for thread, _ in sources} == {"source-hashes"}
    first_hash = calls.index(sources[0])
    last_tensor = max(i for i, (what, _) in enumerate(calls) if what == "produce")
    assert first_hash < last_tensor  # begun before the last tensor, not after the build


def test_a_source_that_cannot_be_hashed_fails_the_build_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: Path) -> None:
    from moecompose import artifact

    monkeypatch.setenv("MOECOMPOSE_CACHE_DIR", str(tmp_path / "cache"))

    def unreadable(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(artifact, "sha256_file", unreadable)
    out = tmp_path / "out" / "model"
    with pytest.raises(MoeComposeError, match=r"cannot read \S+/model\.safetensors: Permission denied"
                       ) as info:
        mc.build(spec, out)
    assert "output" not in str(info.value) and str(out) not in str(info.value)
    assert not out.exists() and not out.parent.exists()
