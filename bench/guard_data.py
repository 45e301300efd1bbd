"""`python -m bench.guard_data SRC`: derive the guard's public development sets.

Run once by hand against a checkout of github.com/brmson/dataset-sts (commit
e1d3375f5b3bc24f21aa4e46f96eb379e9fc1081); writes small TSVs to
bench/data/guard/ so that `python -m bench.guard_calibration` reproduces
without the source tree. Columns: id, label (1 = the two texts mean the same
for a cache: one's answer serves the other), score (the set's own gold
similarity, 0-5 / 1-5), a, b. See bench/data/guard/README.md for licences.

Labels, one rule for both sets (set before looking at any guard output):
1 when the gold similarity is >= 4 ("mostly equivalent": STS's own scale
wording) and, for SICK, the pair is not a contradiction; 0 otherwise.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "guard"
SICK_SAMPLE = 3000  # of ~9,800 pairs: keeps embedding time and the repo small


def _show(git_dir: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"],
                          check=True, capture_output=True, text=True).stdout


def _clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def headlines(git_dir: str) -> list[tuple]:
    rows = []
    for year in (2013, 2014, 2015, 2016):
        for i, line in enumerate(_show(git_dir, f"data/sts/semeval-sts/{year}/headlines.test.tsv").splitlines()):
            parts = line.split("\t")
            if len(parts) != 3 or not parts[0].strip():
                continue  # unscored pair
            score = float(parts[0])
            rows.append((f"{year}-{i}", int(score >= 4.0), parts[0].strip(), _clean(parts[1]), _clean(parts[2])))
    return rows


def sick(git_dir: str) -> list[tuple]:
    rows = []
    for name in ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt"):
        lines = _show(git_dir, f"data/sts/sick2014/{name}").splitlines()
        for line in lines[1:]:
            pid, a, b, score, judgment = line.split("\t")[:5]
            label = int(float(score) >= 4.0 and judgment != "CONTRADICTION")
            rows.append((pid, label, score, _clean(a), _clean(b)))
    rows.sort(key=lambda r: hashlib.sha1(f"sick-sample-{r[0]}".encode()).hexdigest())
    return sorted(rows[:SICK_SAMPLE], key=lambda r: int(r[0]))


def write(name: str, rows: list[tuple]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{name}.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("id\tlabel\tscore\ta\tb\n")
        for r in rows:
            f.write("\t".join(str(x) for x in r) + "\n")
    print(f"{name}: {len(rows)} pairs, {sum(r[1] for r in rows)} positive")


if __name__ == "__main__":
    src = sys.argv[1]
    write("sts_headlines", headlines(src))
    write("sick", sick(src))
