"""`lmn data judgebench DIR`: files checked against their sha256 before they are kept. The fetch runs here
from a local mirror (file:// URLs; no network in tests); the real files' hashes are held against the
shared copies."""

import hashlib
import re
import shutil
import subprocess

import pytest
from judgebench_files import DATA, MISSING, vanilla_copy
from serve_load import env, lmn

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judgebench.data import (
    JUDGEBENCH_FILES,
    DataFile,
    fetch_judgebench,
    verify_judgebench,
)


def mirror(tmp_path, contents: dict[str, bytes]) -> tuple[str, tuple[DataFile, ...]]:
    """A local stand-in for JudgeBench's repository, and file specs whose hashes are the contents'."""
    root = tmp_path / "mirror"
    files = []
    for name, data in contents.items():
        (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "src" / name).write_bytes(data)
        files.append(DataFile(f"out/{name}", f"src/{name}", hashlib.sha256(data).hexdigest()))
    return root.as_uri(), tuple(files)


def test_fetch_keeps_only_files_whose_hash_matches(tmp_path):
    base_url, files = mirror(tmp_path, {"a.jsonl": b'{"x": 1}\n', "sub/b.jsonl": b'{"y": 2}\n'})
    dest = tmp_path / "dest"
    assert verify_judgebench(dest, files) == [f"{dest / f.path}: missing" for f in files]
    assert fetch_judgebench(dest, files=files, base_url=base_url) == [dest / f.path for f in files]
    assert verify_judgebench(dest, files) == [] and (dest / "out/sub/b.jsonl").read_bytes() == b'{"y": 2}\n'
    assert fetch_judgebench(dest, files=files, base_url=base_url) == []  # already there: nothing fetched
    (dest / "out/a.jsonl").write_bytes(b"tampered\n")
    assert [p.split(":")[0] for p in verify_judgebench(dest, files)] == [str(dest / "out/a.jsonl")]
    assert fetch_judgebench(dest, files=files, base_url=base_url) == [dest / "out/a.jsonl"]  # repaired
    wrong = (DataFile("out/c.jsonl", "src/a.jsonl", "0" * 64),)
    with pytest.raises(LatentMergeError, match=r"src/a.jsonl: sha256 .* expected 0000.*not written"):
        fetch_judgebench(dest, files=wrong, base_url=base_url)
    assert not (dest / "out/c.jsonl").exists() and not list(dest.rglob("*.tmp"))
    with pytest.raises(LatentMergeError, match="cannot fetch"):
        fetch_judgebench(dest / "other", files=files, base_url=(tmp_path / "nowhere").as_uri())


def test_the_pinned_hashes_are_the_shared_copies_and_the_cli_checks_a_folder(tmp_path):
    assert all((DATA / f.path).is_file() for f in JUDGEBENCH_FILES[:4]), MISSING
    folder = tmp_path / "jb"
    for f in JUDGEBENCH_FILES:
        (folder / f.path).parent.mkdir(parents=True, exist_ok=True)
        if f.path == "vanilla_prompt.jinja2" and vanilla_copy().name != f.path:  # quoted in PROMPTS.md
            text = vanilla_copy().read_text(encoding="utf-8")
            (folder / f.path).write_text(re.search(r"````jinja\n(.*?)\n````", text, re.S).group(1))
        else:
            shutil.copyfile(DATA / f.path, folder / f.path)
    assert verify_judgebench(folder) == []
    out = subprocess.run(lmn("data", "judgebench", str(folder)), capture_output=True, text=True, env=env())
    assert out.returncode == 0 and "0 fetched" in out.stdout, out.stderr[-2000:]  # nothing left to fetch
