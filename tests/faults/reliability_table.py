"""Print the reliability table (docs) from a JUnit XML report of the fault suite:

    pytest -m faults tests/faults -q --junitxml=/tmp/faults.xml
    python tests/faults/reliability_table.py /tmp/faults.xml

Every case asserts that its fault is caught (exit 2 / CacheError / SIGKILL survived), that the message is one line
naming the file and fix (no traceback), and that no data is lost or silently wrong; a passing case is therefore
"caught, 0 lost or wrong, 0 tracebacks". Resume equality = cases that end with `assert_same_cache` against a clean
build after the fault."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, as pytest puts it
from faults.test_corruption import DAMAGES  # noqa: E402 - after the path set-up

# (test function prefix, row label, ends in a byte-identical resume?)
ROWS = [
    ("test_corruption.test_verify_catches", "corruption matrix: `cache_tools verify`", False),
    ("test_corruption.test_resume_repairs_or_refuses", "corruption matrix: `build-cache --resume`", True),
    ("test_corruption.test_reader_refuses", "corruption matrix: reader (`TeacherCacheReader`)", False),
    ("test_kill_resume.test_kill_and_resume", "SIGKILL at an injected point, then --resume", True),
    ("test_kill_resume.test_resume_killed_again", "SIGKILL, resume SIGKILLed too, resume again", True),
    ("test_kill_resume.test_interrupted_build_resumes", "SIGINT (exit 130, one line) / SIGTERM, then --resume", True),
    ("test_kill_resume.test_killed_build_is_reported", "killed folder seen by verify / reader / plain rerun", False),
    ("test_concurrency_diskfull.test_second_build", "second build (plain, --resume, --overwrite) while one runs",
     True),
    ("test_concurrency_diskfull.test_lock", "build lock refuses and releases", False),
    ("test_concurrency_diskfull.test_disk_full_is", "disk full (tokenizer, shard write, shard close)", True),
    ("test_concurrency_diskfull.test_disk_full_before", "disk full at the first manifest write", False),
    ("test_concurrency_diskfull.test_output_is_a_file", "--output is a file", False),
    ("test_corruption.test_compact_manifest", "compact manifest edited to say fp16: verify / reader / --resume", True),
    ("test_bad_text.", "bad text (UTF-8, JSON, non-text, missing/null + console/inspect count, NUL, 5 MB line, no "
     "column)", False),
    ("test_compact_blobs.", "compact blobs damaged under valid shard checksums (bit flip, truncation, codec id, "
     "blobs swapped between rows, format 2 blob): verify / reader / --resume", False),
    ("test_chat_faults.", "conversations: malformed rows, chat templates, damaged assistant/target masks", False),
    ("test_xtok_store.test_damaged", "cross-tokenizer store damaged (a value, swapped rows, offsets): loader + "
     "prepare_xtok rerun", False),
    ("test_xtok_store.", "cross-tokenizer store of an older format; prepare_xtok killed, then rerun", False),
    ("test_training_checksums.", "same-size damage to a shard on the default training path", False),
    ("test_training_faults.test_disk_full", "disk full while saving a checkpoint, then resume", False),
    ("test_training_faults.", "training: unusable output, bad flags, kill + resume, cache cut mid-run, sampled KD",
     False),
]
# Damage that --resume must refuse (not repair): a manifest of another format version.
REFUSED = tuple(d.name for d in DAMAGES if d.resume == "refused")
UNIT = ("test_fault_point_parsing", "test_matrix_covers_the_issue")  # checks of the suite itself, not fault cases


def main(path: str) -> None:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # label -> [tried, passed]
    failed: list[str] = []
    refusals: dict[str, int] = defaultdict(int)  # correct refusals: caught, but nothing to compare with a clean build
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}.{case.get('name')}"
        skipped = case.find("skipped")
        if any(unit in name for unit in UNIT) or (skipped is not None and "xfail" not in skipped.get("type", "")):
            continue
        label = next((lab for prefix, lab, _ in ROWS if name.startswith(prefix)), "other")
        ok = case.find("failure") is None and case.find("error") is None and skipped is None  # xfail: not handled
        counts[label][0] += 1
        counts[label][1] += ok
        if ok and any(f"[{refused}]" in name for refused in REFUSED):
            refusals[label] += 1
        if not ok:
            failed.append(name)
    print("| cases | tried | caught, one line, nothing lost | data lost or wrong | tracebacks | resume == clean |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    total = [0, 0, 0]
    for _, label, resumes in ROWS:
        tried, passed = counts.get(label, [0, 0])
        total[0] += tried
        total[1] += passed
        equal = passed - refusals[label]
        total[2] += equal if resumes else 0
        note = f" ({refusals[label]} refused in one line, folder unchanged)" if refusals[label] else ""
        print(f"| {label} | {tried} | {passed} | {'0' if passed == tried else '?'} | "
              f"{'0' if passed == tried else '?'} | {f'{equal}/{tried - refusals[label]}{note}' if resumes else '-'} |")
    print(f"| **total** | **{total[0]}** | **{total[1]}** | | | **{total[2]}** |")
    if failed:
        print("\nnot handled (failing or xfail cases): " + ", ".join(failed))


if __name__ == "__main__":
    main(sys.argv[1])
