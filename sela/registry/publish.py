"""Version a pipeline run with DVC + git: lock, commit, push the data, then tag.

The Prefect flow runs the stage code directly (without ``dvc repro``). :func:`publish_version` then leaves the
repository exactly as ``dvc repro`` would have (``dvc.lock`` records the current deps/outs, ``dvc status`` is clean),
commits the pipeline files, pushes the data and only then creates an annotated tag ``<prefix>-v<N>``. A tag is
therefore a promise that ``dvc get <repo> <path> --rev <tag>`` works for someone without our DVC cache.

Remote location, found by experiment with dvc 3.67.1 (a cache-less ``git clone`` of the repo as the consumer):

* A *relative* local remote URL in ``.dvc/config`` is resolved against the ``.dvc/`` folder of whatever checkout
  DVC reads the config from. With a plain local path (``dvc get /path/clone ...``, ``dvc.api.read(repo=path)``)
  DVC reads the remote from that path's *working tree* config, so the relative URL points next to the clone and
  fails ("No storage files available" / ``PathMissingError``) unless the clone happens to sit where the original
  repo sits. With a ``file://`` (or any git) URL DVC reads the tag's committed config in a temporary clone under
  /tmp, so a relative URL always fails.
* An *absolute* local URL works in all four cases (local path or ``file://``, CLI or API).

So remotes are written as absolute paths, and a relative local URL found in the config is rewritten to the absolute
path it currently means. The default location is the sibling folder ``<repo>/../<repo-name>-dvc-storage``: outside
the work tree, so ``git clean -fdx``, deleting ``.dvc/cache`` or re-cloning the repo cannot destroy it, and neither
git nor DVC has to be told to ignore it.

No Prefect imports here: the flow module wraps these functions as tasks.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import configobj
import yaml

__all__ = ["DEFAULT_REMOTE_NAME", "ensure_default_remote", "latest_version", "publish_version"]

DEFAULT_REMOTE_NAME = "storage"

# Used only per command (``git -c ...``) when the repo has no identity: never written to any git config.
_FALLBACK_IDENTITY = {"user.name": "sela-pipeline", "user.email": "sela-pipeline@localhost"}

# "s3://bucket", "file:///x", "ssh://..." are URLs; anything else is a local path (absolute or relative).
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _env() -> dict[str, str]:
    """Environment for dvc/git subprocesses: analytics off (no network here, and none wanted in CI)."""
    env = dict(os.environ)
    env["DVC_NO_ANALYTICS"] = "1"
    # A missing credential must fail, not hang a worker on a prompt.
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


def _run(args: list[str], repo: Path, what: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command in ``repo``; on failure raise RuntimeError carrying the command's own message."""
    proc = subprocess.run(args, cwd=repo, env=_env(), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        detail = "\n".join(s.strip() for s in (proc.stderr, proc.stdout) if s.strip())
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(args)}\n{detail}")
    return proc


def _dvc(repo: Path, *args: str, what: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run dvc from *this* interpreter's environment: a Prefect worker need not have the venv's bin/ on PATH."""
    return _run([sys.executable, "-m", "dvc", *args], repo, what or f"dvc {args[0]}")


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["git", *args], repo, f"git {args[0]}", check=check)


def _identity_args(repo: Path) -> list[str]:
    """``-c`` options for commit/tag: the configured identity if any (repo, global or system), else the fallback."""
    args: list[str] = []
    for key, fallback in _FALLBACK_IDENTITY.items():
        if not _git(repo, "config", "--get", key, check=False).stdout.strip():
            args += ["-c", f"{key}={fallback}"]
    return args


def _default_remote_dir(repo: Path) -> Path:
    return repo.parent / f"{repo.name}-dvc-storage"


def _ensure_default_remote(repo: Path, remote_dir: Path | None) -> tuple[str, str]:
    """Implementation of :func:`ensure_default_remote`; also returns the remote's name (``dvc push -r``)."""
    dvc_dir = repo / ".dvc"
    if not dvc_dir.is_dir():
        raise FileNotFoundError(f"{repo} is not a DVC repository (no .dvc/): run `dvc init` first")
    # Read the raw project config: `dvc remote list` / `dvc config` print relative URLs already resolved, and a
    # relative URL is exactly what must be detected. configobj is what DVC itself uses for this file.
    config_file = dvc_dir / "config"
    raw = configobj.ConfigObj(str(config_file)) if config_file.exists() else configobj.ConfigObj()
    name = raw.get("core", {}).get("remote")
    section = raw.get(f'remote "{name}"') if name else None
    url = section.get("url") if section else None

    if remote_dir is not None:
        wanted = str((repo / remote_dir).resolve())  # relative means relative to the repo, never to the cwd
    elif url and _URL_SCHEME.match(url):
        return name, url  # s3://, ssh://, file://...: not ours to move
    elif url:
        wanted = str((dvc_dir / url).resolve())  # same as DVC's own resolution; a no-op for absolute paths
    else:
        wanted = str(_default_remote_dir(repo))

    if url == wanted:
        return name, wanted  # idempotent: do not touch the file, so git sees no change
    if section is not None:
        # modify, not `add -f`: keeps any other options of the existing remote.
        _dvc(repo, "remote", "modify", "--project", name, "url", wanted)
    else:
        name = name or DEFAULT_REMOTE_NAME
        _dvc(repo, "remote", "add", "--project", "--default", "--force", name, wanted)
    # The folder is not created here: `dvc push` creates it, and a bad location should surface as a push error.
    return name, wanted


def ensure_default_remote(repo: Path, remote_dir: Path | None = None) -> str:
    """Make sure the committed ``.dvc/config`` names a default remote, and return its URL.

    * ``remote_dir`` given: the default remote (existing name, else ``storage``) points at it, as an absolute path
      (a relative ``remote_dir`` is taken relative to ``repo``).
    * ``remote_dir`` omitted: an existing default remote is kept; a relative local URL is rewritten as the absolute
      path it currently resolves to (relative URLs break ``dvc get`` from clones, see the module docstring);
      without any default remote, ``<repo>/../<repo-name>-dvc-storage`` becomes the default.

    Idempotent: a second call with the same arguments changes nothing. ``.dvc/config.local`` is not consulted:
    consumers only ever see the committed config.
    """
    return _ensure_default_remote(Path(repo).resolve(), remote_dir)[1]


def _version_tags(repo: Path, tag_prefix: str, *extra: str) -> list[tuple[int, str]]:
    """(N, tag) for every tag ``<prefix>-v<N>``, sorted by N. ``extra`` narrows ``git tag --list``."""
    pattern = re.compile(rf"^{re.escape(tag_prefix)}-v(\d+)$")
    listed = _git(repo, "tag", "--list", *extra, f"{tag_prefix}-v*").stdout.split()
    return sorted((int(m.group(1)), tag) for tag in listed if (m := pattern.match(tag)))


def latest_version(repo: Path, tag_prefix: str) -> str | None:
    """The tag ``<prefix>-v<N>`` with the highest N (numeric, so v10 beats v9), or None if there is none."""
    tags = _version_tags(Path(repo).resolve(), tag_prefix)
    return tags[-1][1] if tags else None


def _pipeline_files(repo: Path) -> list[Path]:
    """Every ``dvc.yaml`` and ``.dvc`` file git would see (tracked or not ignored): the pipeline's definitions."""
    listed = _git(repo, "ls-files", "--cached", "--others", "--exclude-standard", "--", "dvc.yaml", "*/dvc.yaml",
                  "*.dvc").stdout.splitlines()
    return sorted({repo / name for name in listed if (repo / name).exists()})


def _pipeline_layout(repo: Path) -> tuple[set[Path], list[Path]]:
    """(declared outs, files that belong in git), read from the files DVC wrote, after ``dvc commit -f``.

    ``dvc.lock`` holds every stage as DVC resolved it (foreach/matrix/templating expanded), its params files and
    its outs (metrics and plots included), paths relative to the lock's folder; a ``.dvc`` file lists its outs the
    same way. DVC ignores a cached out in git through a ``/<name>`` line in the ``.gitignore`` beside it; an
    uncached one (``cache: false`` metrics) is versioned by git itself. Reading files, not importing DVC, keeps the
    core free of DVC's Python API (all writes go through the dvc command anyway).
    """
    outs: set[Path] = set()
    git_files: list[Path] = [repo / ".dvc" / "config", repo / ".dvc" / ".gitignore", repo / ".dvcignore"]
    for definition in _pipeline_files(repo):
        git_files.append(definition)
        if definition.name == "dvc.yaml":
            lock = definition.with_name("dvc.lock")
            git_files.append(lock)
            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.exists() else {}
        else:
            stages = {definition.name: yaml.safe_load(definition.read_text()) or {}}
        for stage in stages.values():
            git_files += [definition.parent / name for name in stage.get("params", {})]
            for out in stage.get("outs", []):
                path = (definition.parent / out["path"]).resolve()
                outs.add(path)
                ignore = path.parent / ".gitignore"
                ignored = ignore.exists() and f"/{path.name}" in ignore.read_text().splitlines()
                git_files.append(ignore if ignored else path)
    return outs, git_files


def _is_declared(path: Path, outs: set[Path]) -> bool:
    """True if ``path`` is an out or lies inside a directory out (e.g. one shard of ``data/shards``)."""
    return path in outs or any(out in path.parents for out in outs)


def _tag_prefix_ok(repo: Path, tag_prefix: str) -> bool:
    return _git(repo, "check-ref-format", f"refs/tags/{tag_prefix}-v1", check=False).returncode == 0


def publish_version(repo: Path, stage_outputs: list[str], tag_prefix: str, message: str) -> dict[str, str]:
    """Record the current pipeline state in DVC and git, push the data, then tag it ``<prefix>-v<N>``.

    Steps: ``dvc commit -f`` (dvc.lock := current deps/outs, nothing re-run; ``dvc status`` must then be clean, so
    ``dvc repro`` has nothing to do), ``git add`` of dvc.yaml/dvc.lock/params/uncached metrics/DVC's .gitignore
    files/.dvc/config, ``git commit`` of just those paths (other staged work is left alone), ``dvc push`` and
    finally an annotated tag with N = 1 + the highest existing N for the prefix.

    ``stage_outputs`` are the paths (relative to ``repo``) the run produced; each must exist and be declared as an
    out in the pipeline, otherwise it would silently not be versioned.

    Failure and retry: if the push fails a RuntimeError carrying dvc's message is raised and no tag is created.
    The commit stays; a retry (e.g. after :func:`ensure_default_remote` with a working ``remote_dir``) makes no
    empty commit (or a new one recording only the remote change) and then pushes and tags. If HEAD already carries
    a ``<prefix>-v*`` tag, that tag is returned instead of a duplicate version of the same commit.

    Returns ``{"tag": ..., "commit": ..., "remote": ...}``.
    """
    repo = Path(repo).resolve()
    if not _tag_prefix_ok(repo, tag_prefix):
        raise ValueError(f"{tag_prefix!r} cannot be used in a git tag name")
    missing = [p for p in stage_outputs if not (repo / p).exists()]
    if missing:
        raise FileNotFoundError(f"stage outputs missing in {repo}: {missing}")

    remote_name, remote_url = _ensure_default_remote(repo, None)

    # (1) What `dvc repro` would have written, without running anything: hashes of the current deps/outs go to
    # dvc.lock and cached outs into the DVC cache (+ .gitignore entries). -f: no confirmation prompt. Nothing is
    # committed to git or pushed before the outputs are known to be declared.
    _dvc(repo, "commit", "--force")
    declared, git_files = _pipeline_layout(repo)
    undeclared = [p for p in stage_outputs if not _is_declared((repo / p).resolve(), declared)]
    if undeclared:
        raise ValueError(f"not declared as outs in the DVC pipeline, so they would not be versioned: {undeclared}")
    status = json.loads(_dvc(repo, "status", "--json").stdout or "{}")
    if status:
        raise RuntimeError(f"`dvc status` is not clean after `dvc commit -f`; `dvc repro` would re-run: {status}")

    # (2)+(3) Commit only the pipeline's files; `commit -- paths` leaves anything else someone staged alone.
    paths = sorted({str(p.relative_to(repo)) for p in git_files if p.exists()})
    _git(repo, "add", "--", *paths)
    # Without a HEAD yet (fresh repo), `diff --cached` compares against the empty tree: still correct.
    if _git(repo, "diff", "--cached", "--name-only", "--", *paths).stdout.strip():
        _git(repo, *_identity_args(repo), "commit", "--quiet", "-m", message, "--", *paths)
    # else: nothing changed (a retry after a failed push): no empty duplicate commit, HEAD is the version.
    commit = _git(repo, "rev-parse", "HEAD").stdout.strip()

    # (4) Data before tag: a tag whose data never reached the remote cannot be pulled by anyone else.
    try:
        _dvc(repo, "push", "--remote", remote_name, what=f"dvc push to {remote_url}")
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\nNo tag was created; commit {commit} is kept. Fix the remote and retry.") from exc

    # (5) Same commit published twice (retry after a lost response, double run): reuse its tag.
    already = _version_tags(repo, tag_prefix, "--points-at", commit)
    if already:
        return {"tag": already[-1][1], "commit": commit, "remote": remote_url}
    existing = _version_tags(repo, tag_prefix)
    tag = f"{tag_prefix}-v{existing[-1][0] + 1 if existing else 1}"
    _git(repo, *_identity_args(repo), "tag", "--annotate", "--message", message, tag, commit)
    return {"tag": tag, "commit": commit, "remote": remote_url}
