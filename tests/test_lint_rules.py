"""Every lint suppression in the shipped code says why (#16 item 5): a bare `# type: ignore[...]`
or `# noqa: X` hides a finding without telling the next reader whether it is still needed."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIRS = ("gpud", "gpud_client", "tui")
SUPPRESSION = re.compile(r"# type: ignore|# noqa")
# A suppression with a code, then a reason after it (a dash, a colon, a "#" or a parenthesis).
WITH_REASON = re.compile(r"(# type: ignore\[[^]]*\]|# noqa: [A-Z0-9, ]+)\s*(-|—|:|#|\()")


def bare_suppressions(root: Path) -> list[str]:
    found = []
    for d in DIRS:
        for path in sorted((root / d).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if SUPPRESSION.search(line) and not WITH_REASON.search(line):
                    found.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    return found


def test_every_suppression_says_why() -> None:
    bare = bare_suppressions(REPO)
    assert not bare, "suppressions without a reason (add one: '# noqa: X - why'):\n" + "\n".join(
        bare
    )


def test_the_check_catches_a_bare_suppression(tmp_path: Path) -> None:
    (tmp_path / "gpud").mkdir()
    (tmp_path / "gpud" / "m.py").write_text(
        "import a  # type: ignore[import-untyped]\n"
        "import b  # type: ignore\n"
        "x = 1  # noqa: E501\n"
        "import c  # type: ignore[import-untyped]  # ships no hints\n"
        "y = 2  # noqa: E501 - a long URL\n"
    )
    for d in DIRS[1:]:
        (tmp_path / d).mkdir()
    assert [b.split(":")[1] for b in bare_suppressions(tmp_path)] == ["1", "2", "3"]
