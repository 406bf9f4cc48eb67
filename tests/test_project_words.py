"""The project's files speak of the project: what it does and how to use it, not how it was made.

Every text file git knows (tracked, or new and not ignored: docs, code, comments, tests, params,
benchmarks, generated reports) is scanned for words about the work process (sessions, issue
numbers, reviews, a time budget of the work, ...). History belongs in CHANGELOG.md, stated as what
changed. The patterns are precise on purpose: `scope="session"` (pytest), a process started in its
own session, Ray's dashboard agent, a link to another project's GitHub issues/123 all pass.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

PROCESS_WORDS = [
    # a working session: "this session", "in that session", "the eighth session", "later session"
    r"\b(this|that|these|those|later|earlier|previous|next|last|same|first|second|third|fourth|fifth|sixth|"
    r"seventh|eighth|ninth|tenth|one|work|working|review|development) sessions?\b",
    r"\bsessions? (was|were|is) (lent|given|run|spent|held)\b",
    r"\bissues? ?#\d+",  # "issue #11", "issues #14"
    r"\bissue \d+\b",  # "issue 14", "Issue 14"
    r"\b(the|this|that|an|our) issue's\b",  # "the measure"
    r"\bfiled by\b",
    r"\breview(s|ed|er|ers)?\b",
    r"\bmend(s|ed)?\b",
    r"\bnewcomers?\b",
    r"\b\d+[- ]minutes? budget\b",
    r"\b(time|device|work|session) budget\b",
    r"\bof the budget\b",
    r"\bbudget (is|was) (left|spent|used)\b",
    r"\b(was|were|is|are) lent\b",
    r"\blent to\b",
    r"\b(other|another|the) (developers?|engineers?)(['’]s?)?\b",
    r"\b(the|our|a) team\b",
    r"\bself[- ]correction",
]
PATTERN = re.compile("|".join(f"(?:{p})" for p in PROCESS_WORDS), re.I)

BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".parquet", ".npz", ".pt", ".pth", ".zip", ".gz"}
SKIP = {"dvc.lock"}  # hashes and paths only, written by DVC


def project_files() -> list[Path]:
    """Tracked files and new files git does not ignore, that exist on disk."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return sorted({ROOT / name for name in out.split("\0") if name})


def text_of(path: Path) -> str | None:
    if path.suffix.lower() in BINARY_SUFFIXES or path.name in SKIP or not path.is_file():
        return None
    data = path.read_bytes()
    if b"\0" in data[:4096]:
        return None
    return data.decode("utf-8", errors="replace")


def process_words(paths: list[Path]) -> list[str]:
    """'path:line: match' for every process word in `paths` (this file, which lists them, excepted)."""
    found = []
    for path in paths:
        if path.resolve() == THIS:
            continue
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in PATTERN.finditer(line):
                found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}: "
                             f"{match.group(0)!r}")
    return found


def test_no_file_of_the_project_speaks_of_the_work_process() -> None:
    found = process_words(project_files())
    assert not found, "words about how the work was done, not about the project:\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    "None was lent to this session, so those figures are missing.",
    "## Parity with the official STM implementation (issue #11)",
    '"""Issue 14: per-rule STRMN training."""',
    "# the bar of issue 14 holds",
    "Review mend: one label_shares",
    "the newcomer run took 13 min 51 s",
    "1 min 9 s of the 15-minute budget is left",
    "(the issue's measure)",
    "taken while other engineers' jobs shared the machine",
    "Tried in that session and not kept",
])
def test_a_planted_process_word_is_found(tmp_path: Path, line: str) -> None:
    planted = tmp_path / "planted.md"
    planted.write_text(f"# A page\n\nSome text.\n{line}\n")
    hits = process_words([planted])
    assert hits and all(hit.startswith(f"{planted}:4: ") for hit in hits)


@pytest.mark.parametrize("line", [
    '@pytest.fixture(scope="session")',
    "proc = subprocess.Popen(args, start_new_session=True)",
    "Every process is started in its own session and stopped by its process group",
    "init_ray is a no-op on a live session: start from none",
    '"--dashboard-agent-listen-port", "--runtime-env-agent-port"',
    "see https://github.com/pytorch/pytorch/issues/12345 for the NNPACK thread pool",
    "MLflow helpers: the project's tracking store",
    "the step counts here are our estimate of that budget",
    "what the memory holds decides the score; previous frames follow the drift",
])
def test_project_words_are_not_flagged(tmp_path: Path, line: str) -> None:
    ordinary = tmp_path / "ordinary.py"
    ordinary.write_text(line + "\n")
    assert process_words([ordinary]) == []


def test_the_scan_sees_a_new_untracked_file(tmp_path: Path) -> None:
    """A new file under the repository counts before it is committed (git's --others, not ignored)."""
    planted = ROOT / "tests" / f".planted-{tmp_path.name}.md"
    planted.write_text("This was measured in the eighth session.\n")
    try:
        assert planted in project_files()
        assert process_words([planted]) and "eighth session" in process_words([planted])[0]
    finally:
        planted.unlink()
