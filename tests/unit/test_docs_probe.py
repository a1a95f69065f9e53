"""One description of the probe: protocol/probe.py's probe_values makes it, and every description
of its elements or its size in the package's docstrings and comments, the docs and the README
agrees with what it makes (issue 25: the probe had been described as two, three and four
elements, and as [1, rank+1, c])."""

import glob
import os
import re

from launch import ROOT

from horovod_tnq.protocol.probe import HEAD, probe_values

RANK, CODE, SIZE = 2, 7, 4
# a probe written out: "[1, -1, rank + 1, c, c², mark_0 …]" and the like
LITERAL = re.compile(r"\[1,[^\]\n]*rank ?\+ ?1[^\]\n]*\]?")
SIZE_TERM = re.compile(r"\bN ?\+ ?(\d+)")
COUNT_WORDS = re.compile(r"\b(one|two|three|four|five|six|[1-6]) (?:elements|floats|numbers|"
                         r"values|entries)\b", re.I)


def texts():
    """(path, text) of every file that may describe the probe."""
    paths = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md")),
             *glob.glob(os.path.join(ROOT, "horovod_tnq", "**", "*.py"), recursive=True)]
    for path in sorted(paths):
        with open(path, encoding="utf-8") as f:
            yield os.path.relpath(path, ROOT), f.read()


def sentences_about_the_probe():
    for path, text in texts():
        flat = re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)  # lines (and comment lines) joined
        for sentence in re.split(r"(?<=[.;])\s+", flat):
            if "probe" in sentence.lower():
                yield path, sentence


def head_of(literal):
    """The values a written-out probe's head takes at RANK and CODE, up to its marks."""
    items = [item.strip() for item in literal.strip("[]").split(",")]
    head = []
    for item in items:
        if "mark" in item or "…" in item or "..." in item or not item:
            break
        head.append(eval(item.replace("²", "**2"), {}, {"rank": RANK, "c": CODE}))
    return head


def test_the_probe_is_head_plus_one_mark_per_rank():
    probe = probe_values(RANK, CODE, SIZE)
    assert HEAD == 5 and len(probe) == SIZE + HEAD
    assert probe[:HEAD] == [1.0, -1.0, RANK + 1.0, CODE, CODE * CODE]
    assert probe[HEAD:] == [1.0 if r == RANK else 0.0 for r in range(SIZE)]


def test_every_written_out_probe_is_what_probe_values_makes():
    found = []
    for path, text in texts():
        for literal in LITERAL.findall(text):
            found.append(path)
            assert head_of(literal) == probe_values(RANK, CODE, SIZE)[:HEAD], (path, literal)
    assert {"docs/design.md", "horovod_tnq/protocol/probe.py"} <= set(found)


def test_every_size_given_for_the_probe_is_n_plus_head():
    sizes = []
    for path, sentence in sentences_about_the_probe():
        for term in SIZE_TERM.findall(sentence):
            sizes.append(path)
            assert int(term) == HEAD, (path, sentence)
        assert not COUNT_WORDS.search(SIZE_TERM.sub("", sentence)), (path, sentence)
    assert "docs/design.md" in sizes and "horovod_tnq/protocol/__init__.py" in sizes
