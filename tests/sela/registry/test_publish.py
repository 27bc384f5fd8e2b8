"""sela.registry.publish against a real throw-away git + DVC repo (dvc/git via subprocess, no network).

Consumers are always checked from a cache-less `git clone` in another folder, with the producer's DVC cache
deleted: a local path with a cache would hide a missing push.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sela.registry.publish import ensure_default_remote, latest_version, publish_version

LABELS = "labels/labels.parquet"
OUTPUTS = ["out/a.txt", LABELS, "metrics/metrics.json"]

# Two stages in the style of the real pipeline; `b` writes a binary "labels" file and an uncached metrics file.
PIPELINE = {
    "stages": {
        "a": {
            "cmd": "python -c \"import pathlib, yaml; n = yaml.safe_load(open('params.yaml'))['a']['n']; "
            "pathlib.Path('out').mkdir(exist_ok=True); pathlib.Path('out/a.txt').write_text('x' * n)\"",
            "params": ["a.n"],
            "outs": ["out/a.txt"],
        },
        "b": {
            "cmd": "python -c \"import json, pathlib; t = pathlib.Path('out/a.txt').read_bytes(); "
            "[pathlib.Path(d).mkdir(exist_ok=True) for d in ('labels', 'metrics')]; "
            "pathlib.Path('labels/labels.parquet').write_bytes(bytes(range(256)) + t); "
            "pathlib.Path('metrics/metrics.json').write_text(json.dumps({'n': len(t)}))\"",
            "deps": ["out/a.txt"],
            "outs": [LABELS],
            "metrics": [{"metrics/metrics.json": {"cache": False}}],
        },
    }
}


def _env() -> dict[str, str]:
    # `python` in the stage commands must be this interpreter (venv with PyYAML), also under `dvc repro`.
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def sh(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh([sys.executable, "-m", "dvc", *args], cwd, check)


def git(cwd: Path, *args: str) -> str:
    return sh(["git", *args], cwd).stdout.strip()


def run_stages(repo: Path, n: int) -> bytes:
    """What the Prefect flow does: set params and run the stage code directly, without dvc. Returns the labels."""
    (repo / "params.yaml").write_text(yaml.safe_dump({"a": {"n": n}}))
    for stage in PIPELINE["stages"].values():
        subprocess.run(stage["cmd"], shell=True, cwd=repo, env=_env(), check=True)
    return (repo / LABELS).read_bytes()


def clone_elsewhere(repo: Path, tmp_path: Path) -> Path:
    """A consumer's checkout: a git clone in another folder, with no DVC cache; the producer's cache is gone too."""
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    clone = tmp_path / "elsewhere" / "clone"
    clone.parent.mkdir(exist_ok=True)
    sh(["git", "clone", "--quiet", str(repo), str(clone)], tmp_path)
    assert not (clone / ".dvc" / "cache").exists()
    return clone


def dvc_get(src: str, rev: str, tmp_path: Path) -> bytes:
    consumer = tmp_path / "consumer"
    consumer.mkdir(exist_ok=True)
    target = consumer / f"{rev}.parquet"
    dvc(consumer, "get", src, LABELS, "--rev", rev, "-o", str(target))
    return target.read_bytes()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "--quiet", "-b", "main")
    git(repo, "config", "user.name", "Test Runner")  # repo-local only
    git(repo, "config", "user.email", "test@example.invalid")
    dvc(repo, "init", "--quiet")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    return repo


@pytest.mark.slow
def test_publish_matches_dvc_repro_state(repo: Path, tmp_path: Path) -> None:
    run_stages(repo, 3)

    result = publish_version(repo, OUTPUTS, "labels", "labels from run 1")

    assert result == {
        "tag": "labels-v1",
        "commit": git(repo, "rev-parse", "HEAD"),
        "remote": str(tmp_path / "repo-dvc-storage"),  # default: absolute sibling folder
    }
    assert git(repo, "cat-file", "-t", "labels-v1") == "tag"  # annotated
    assert git(repo, "rev-parse", "labels-v1^{commit}") == result["commit"]
    assert latest_version(repo, "labels") == "labels-v1"
    # Everything the pipeline produced is in git or ignored-and-in-DVC: nothing left over.
    assert git(repo, "status", "--porcelain") == ""
    committed = set(git(repo, "ls-files").split())
    assert {"dvc.lock", "dvc.yaml", "params.yaml", "metrics/metrics.json", ".dvc/config"} <= committed
    assert {"out/.gitignore", "labels/.gitignore"} <= committed
    assert LABELS not in committed
    assert "Data and pipelines are up to date." in dvc(repo, "status").stdout
    repro = dvc(repo, "repro").stdout
    assert "Data and pipelines are up to date." in repro
    assert "Running stage" not in repro
    assert dvc(repo, "status", "--cloud", "--json").stdout.strip() == "{}"  # everything pushed


@pytest.mark.slow
def test_cacheless_clone_can_get_and_open_the_tag(repo: Path, tmp_path: Path) -> None:
    import dvc.api

    labels = run_stages(repo, 3)
    publish_version(repo, OUTPUTS, "labels", "v1")
    clone = clone_elsewhere(repo, tmp_path)

    assert dvc_get(str(clone), "labels-v1", tmp_path) == labels
    assert dvc.api.read(LABELS, repo=str(clone), rev="labels-v1", mode="rb") == labels
    # A URL (not a local path) makes DVC read the tag's *committed* .dvc/config in a temporary clone.
    with dvc.api.open(LABELS, repo=f"file://{clone}", rev="labels-v1", mode="rb") as fobj:
        assert fobj.read() == labels


@pytest.mark.slow
def test_second_version_after_params_change(repo: Path, tmp_path: Path) -> None:
    labels_v1 = run_stages(repo, 3)
    assert publish_version(repo, OUTPUTS, "labels", "v1")["tag"] == "labels-v1"
    labels_v2 = run_stages(repo, 5)
    assert labels_v2 != labels_v1

    result = publish_version(repo, OUTPUTS, "labels", "v2")

    assert result["tag"] == "labels-v2"
    assert latest_version(repo, "labels") == "labels-v2"
    assert latest_version(repo, "other") is None
    assert dvc(repo, "status", "--json").stdout.strip() == "{}"
    assert "a.n: 5" in (repo / "dvc.lock").read_text()
    # Publishing the same commit again returns its tag rather than a duplicate version (or an empty commit).
    assert publish_version(repo, OUTPUTS, "labels", "again") == result
    clone = clone_elsewhere(repo, tmp_path)
    assert dvc_get(str(clone), "labels-v1", tmp_path) == labels_v1
    assert dvc_get(str(clone), "labels-v2", tmp_path) == labels_v2


@pytest.mark.slow
def test_failed_push_creates_no_tag_and_retry_succeeds(repo: Path, tmp_path: Path) -> None:
    # chmod does not stop root; a path *under a regular file* fails for everyone (ENOTDIR).
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    ensure_default_remote(repo, blocker / "remote")
    run_stages(repo, 3)

    with pytest.raises(RuntimeError, match="dvc push") as excinfo:
        publish_version(repo, OUTPUTS, "labels", "v1")
    assert "Not a directory" in str(excinfo.value)  # dvc's own message is passed on
    assert latest_version(repo, "labels") is None
    assert git(repo, "tag", "--list") == ""
    failed_commit = git(repo, "rev-parse", "HEAD")
    commits = git(repo, "rev-list", "--count", "HEAD")

    blocker.unlink()  # fix the remote without touching the config: the retry has nothing new to commit
    result = publish_version(repo, OUTPUTS, "labels", "v1")

    assert result["tag"] == "labels-v1"
    assert result["commit"] == failed_commit
    assert git(repo, "rev-list", "--count", "HEAD") == commits  # no empty duplicate commit
    assert dvc_get(str(clone_elsewhere(repo, tmp_path)), "labels-v1", tmp_path) == (repo / LABELS).read_bytes()


def test_ensure_default_remote_is_idempotent_and_absolute(repo: Path, tmp_path: Path) -> None:
    config = repo / ".dvc" / "config"
    url = ensure_default_remote(repo)
    assert url == str(tmp_path / "repo-dvc-storage")
    before = config.read_text()
    assert url in before
    assert ensure_default_remote(repo) == url
    assert config.read_text() == before  # second call: file untouched

    # A relative URL (relative to .dvc/, as DVC resolves it) is rewritten to the path it means today.
    config.write_text("[core]\n    remote = mine\n['remote \"mine\"']\n    url = ../../shared-store\n")
    assert ensure_default_remote(repo) == str(tmp_path / "shared-store")
    assert f"url = {tmp_path / 'shared-store'}" in config.read_text()
    assert "remote = mine" in config.read_text()  # the existing remote is kept, not replaced
    # An explicit relative remote_dir is relative to the repo, not to the cwd.
    assert ensure_default_remote(repo, Path("store")) == str(repo / "store")


@pytest.mark.slow
def test_falls_back_to_pipeline_identity(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    git(repo, "config", "--unset", "user.name")
    git(repo, "config", "--unset", "user.email")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-global-gitconfig"))  # hide the machine's identity
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(var, raising=False)
    run_stages(repo, 3)

    result = publish_version(repo, OUTPUTS, "labels", "v1")

    assert git(repo, "log", "-1", "--format=%an <%ae>") == "sela-pipeline <sela-pipeline@localhost>"
    assert "sela-pipeline" in git(repo, "cat-file", "-p", result["tag"])  # tagger
    assert sh(["git", "config", "--local", "--get", "user.name"], repo, check=False).returncode != 0  # none written


def test_rejects_outputs_the_pipeline_does_not_declare(repo: Path) -> None:
    run_stages(repo, 3)
    (repo / "stray.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="stray.bin"):
        publish_version(repo, [*OUTPUTS, "stray.bin"], "labels", "v1")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        publish_version(repo, ["missing.bin"], "labels", "v1")


@pytest.mark.slow
def test_relative_remote_url_breaks_consumers_of_a_clone(repo: Path, tmp_path: Path) -> None:
    """Pins the DVC behaviour behind the absolute-path choice: relative URLs resolve against the *clone*."""
    run_stages(repo, 3)
    (repo / ".dvc" / "config").write_text("[core]\n    remote = rel\n['remote \"rel\"']\n    url = ../../rel-store\n")
    dvc(repo, "commit", "--force")
    dvc(repo, "push")
    assert (tmp_path / "rel-store").is_dir()  # relative to repo/.dvc/
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "relative remote")
    git(repo, "tag", "-a", "rel-v1", "-m", "rel")
    clone = clone_elsewhere(repo, tmp_path)

    failed = dvc(tmp_path, "get", str(clone), LABELS, "--rev", "rel-v1", "-o", str(tmp_path / "x"), check=False)

    assert failed.returncode != 0
    assert "No storage files available" in failed.stderr
