"""The README says what the code does (issue 25): its record-stack table is derived from the
presets, flag by flag, and its parameter count from the model the `record` preset builds."""

import re

import pytest
import torch
from conftest import REPO, load_script

ENTRY = re.compile(r"^`(?P<name>[A-Z0-9_]+)` (?P<value>\S+)(?: -> (?P<record>\S+))?")


def readme_section(title):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def table_entries(section, after=None):
    """[(ENV_NAME, default text, record text)] of every flag in the second column of the first
    table in `section` (the first table after the line starting with `after`, when given)."""
    out = []
    lines = section.splitlines()
    if after is not None:
        lines = lines[next(i for i, line in enumerate(lines) if line.startswith(after)) :]
    table_seen = False
    for line in lines:
        if not line.startswith("|"):
            if table_seen:
                break
            continue
        table_seen = True
        if line.startswith(("| technique", "|---")):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        for part in cells[1].split(", "):
            m = ENTRY.match(part)
            assert m, f"README table entry {part!r} is not `FLAG value[ -> record value]`"
            default = m["value"]
            out.append((m["name"], default, m["record"] or default))
    return out


def same(text, value):
    if text.startswith('"') and text.endswith('"'):  # a quoted string, "" the empty one
        return value == text[1:-1]
    if isinstance(value, bool):
        return text in (("1", "true") if value else ("0", "false"))
    if isinstance(value, (int, float)):
        return float(text) == pytest.approx(float(value))
    return text == str(value)


@pytest.fixture(scope="module")
def gpt():
    return load_script("train_gpt.py")


def test_the_record_stack_table_is_the_presets(gpt):
    entries = table_entries(readme_section("The record stack (train_gpt.py)"))
    assert len(entries) >= 30
    baseline = gpt.Hyperparameters.from_env({"PRESET": "baseline"})
    record = gpt.Hyperparameters.from_env({"PRESET": "record"})
    for name, default, in_record in entries:
        field = name.lower()
        assert hasattr(record, field), f"README names {name}, which is not a hyperparameter"
        assert same(default, getattr(baseline, field)), (name, default, getattr(baseline, field))
        assert same(in_record, getattr(record, field)), (name, in_record, getattr(record, field))
    # Every setting in which `record` differs from `baseline` is in the table, except the run's
    # own identity: the preset's name, its data and tokenizer paths, the record-track switch.
    named = {name.lower() for name, _, _ in entries}
    differ = {f for f in vars(record) if getattr(record, f) != getattr(baseline, f)}
    assert differ - named == {"preset", "data_path", "tokenizer_path", "record_attempt"}


def test_the_readme_parameter_count_is_the_record_models(gpt):
    section = readme_section("The record stack (train_gpt.py)")
    stated = int(re.search(r"\*\*([\d,]+) parameters\*\*", section)[1].replace(",", ""))
    h = gpt.Hyperparameters.from_env({"PRESET": "record"})
    with torch.device("meta"):
        model = gpt.build_model(h)
    assert stated == sum(p.numel() for p in model.parameters())


def test_the_frontier_table_is_its_difference_from_the_record(gpt):
    section = readme_section("The record stack (train_gpt.py)")
    entries = table_entries(section, after="`PRESET=frontier`")
    record = gpt.Hyperparameters.from_env({"PRESET": "record"})
    frontier = gpt.Hyperparameters.from_env({"PRESET": "frontier"})
    named = set()
    for name, in_record, in_frontier in entries:
        field = name.lower()
        named.add(field)
        assert same(in_record, getattr(record, field)), (name, in_record, getattr(record, field))
        assert same(in_frontier, getattr(frontier, field)), (name, getattr(frontier, field))
    # Every setting in which the two presets differ is in the table.
    differ = {f for f in vars(record) if getattr(record, f) != getattr(frontier, f)}
    assert differ - {"preset"} <= named, differ - {"preset"} - named
