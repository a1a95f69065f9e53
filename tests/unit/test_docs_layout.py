"""docs/design.md's "Layout of the repository" against the tree: every module of the package,
every benchmark and example file and every tool at the top (scripts, docker, CI) it names exists,
and every one that exists is named, in the entry of its own directory."""

import os
import re

from launch import ROOT

# directories whose files the layout names one by one, and which of their files count
LISTED_DIRS = ("horovod_tnq/core/", "horovod_tnq/gpu/", "horovod_tnq/protocol/",
               "horovod_tnq/torch/", "horovod_tnq/tensorflow/", "benchmarks/", "examples/")
SOURCE = re.compile(r"\b[A-Za-z_]\w*\.(?:py|c)\b")
# the tools at the top: these directories' files and the root's own (dotfiles aside)
TOOL_DIRS = (".ci", "docker", "scripts")


def layout_entries():
    """{path: its description} from the layout's code block: an entry starts at column 0 with
    its path; indented lines continue it."""
    with open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Layout of the repository"):]
    block = section.split("```")[1]
    entries, path = {}, None
    for line in block.strip("\n").splitlines():
        if line[:1].strip():
            path, _, rest = line.partition(" ")
            entries[path] = rest.strip()
        else:
            entries[path] += " " + line.strip()
    return entries


def sources(directory):
    return sorted(name for name in os.listdir(os.path.join(ROOT, directory))
                  if SOURCE.fullmatch(name) and name != "__init__.py")


def test_every_package_benchmark_and_example_file_is_listed_and_exists():
    entries = layout_entries()
    problems = []
    for directory in LISTED_DIRS:
        assert directory in entries, f"the layout has no entry for {directory}"
        named = set(SOURCE.findall(entries[directory]))
        present = set(sources(directory))
        problems += [f"{directory}{name} exists but the layout does not name it"
                     for name in sorted(present - named)]
        problems += [f"{directory}{name} is in the layout but not in the tree"
                     for name in sorted(named - present)]
    assert not problems, "\n".join(problems)


def test_every_entry_exists_and_every_tool_at_the_top_is_listed():
    entries = layout_entries()
    missing = [path for path in entries if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, f"layout entries not in the tree: {missing}"
    tools = [name for name in os.listdir(ROOT)
             if not name.startswith(".") and os.path.isfile(os.path.join(ROOT, name))]
    for directory in TOOL_DIRS:
        if os.path.isdir(os.path.join(ROOT, directory)):
            tools += [f"{directory}/{name}" for name in os.listdir(os.path.join(ROOT, directory))
                      if os.path.isfile(os.path.join(ROOT, directory, name))]
    unlisted = sorted(set(tools) - set(entries))
    assert not unlisted, f"in the tree but not in docs/design.md's layout: {unlisted}"


def test_the_layout_reader_sees_the_entries():
    entries = layout_entries()
    assert "native.c" in entries["horovod_tnq/core/"]
    assert entries["setup.py"].startswith("builds horovod_tnq/core/native.c")
