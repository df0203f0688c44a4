"""Flags that do nothing in a mode are refused (issue 33, item 4), from the one table in tdm_fast/cli/modes.py:
every flag of a verb is placed in the table, and each mode refuses every flag that only other modes read, with
one ``tdm-fast: error:`` line naming it, exit 2, before anything is written."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from tdm_fast.cli import build_parser, main
from tdm_fast.cli.modes import MODE_FLAGS, SHARED_FLAGS, mode_of, refuse_unread_flags
from tdm_fast.config import TDMConfig

# the least argv that selects each mode (the paths are never read: the refusal comes first)
MODE_ARGV = {
    ("distill", "teacher"): "distill --teacher T --out {O}",
    ("distill", "preset-lora"): "distill --preset sd15 --model M --prompts P.txt --out {O}",
    ("distill", "preset-full"): "distill --preset sd15 --model M --prompts P.txt --out {O} --full-finetune",
    ("export", "compile"): "export --checkpoint C --out {O} --format compile",
    ("export", "onnx"): "export --checkpoint C --out {O} --format onnx",
    ("export", "tensorrt"): "export --checkpoint C --out {O} --format tensorrt",
    ("sample", "labels"): "sample --checkpoint C --out {O}/s",
    ("sample", "prompt"): "sample --prompt a-cat --backend onnx --engine E --out {O}/s",
    ("demo", "digits"): "demo --digits-teacher D --out {O}",  # --pipeline turns it into the pipeline mode
    ("demo", "pipeline"): "demo --pipeline sd15 --out {O}",
    ("demo", "toy2d"): "demo --dataset toy2d --out {O}",
    ("eval", "score"): "eval {O}/student",
    ("eval", "ablations"): "eval --curve-every 5 --ablations --out {O}",  # --pipeline: the pipeline ablations
    ("eval", "ablations-pipeline"): "eval --ablations --pipeline sd15 --out {O}",
    ("teacher train", "toy2d"): "teacher train --dataset toy2d --out {O}",
    ("teacher train", "digits"): "teacher train --dataset digits --out {O}",
    ("teacher train", "digits-t2i"): "teacher train --dataset digits-t2i --pipeline sd15 --out {O}",
}


def _verb_parser(verb):
    """The parser of ``verb`` (a verb of a group, such as ``teacher train``, inside its group's)."""
    parser = build_parser()
    for word in verb.split():
        parser = parser._subparsers._group_actions[0].choices[word]
    return parser


def _parse(argv):
    """``argv`` (verb words first) parsed as the command line parses it."""
    return build_parser().parse_args(argv)


def _shared(verb):
    """SHARED_FLAGS with "<every TDMConfig flag>" spelled out (a bool field also has its --no- form)."""
    if verb != "distill":
        return set(SHARED_FLAGS[verb])
    hints = typing.get_type_hints(TDMConfig)
    fields = [(f.name.replace("_", "-"), hints[f.name] in (bool, bool | None)) for f in dataclasses.fields(TDMConfig)]
    return {*SHARED_FLAGS[verb], *(f"--{name}" for name, _ in fields), *(f"--no-{name}" for name, boolean in fields if boolean)}


@pytest.mark.parametrize("verb", sorted(MODE_FLAGS))
def test_every_flag_is_placed_in_the_table(verb):
    """A new flag must be listed as read by every mode or by some: otherwise a mode would ignore it silently."""
    placed = _shared(verb) | {flag for _, flags in MODE_FLAGS[verb].values() for flag in flags}
    flags = {option for action in _verb_parser(verb)._actions for option in action.option_strings if option.startswith("--")}
    assert flags - placed == set(), "flags missing from tdm_fast/cli/modes.py"
    assert {f for f in placed if not f.startswith("<")} - flags == set(), "the table names flags the verb does not have"
    assert {mode for v, mode in MODE_ARGV if v == verb} == set(MODE_FLAGS[verb])


def _value(verb, flag):
    """A value the flag accepts (so that the refusal, not the flag's own range check, answers)."""
    action = _verb_parser(verb)._option_string_actions[flag]
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(list(action.choices)[0])]
    for candidate in ("2", "0.5"):
        try:
            (action.type or str)(candidate)
            return [candidate]
        except Exception:
            continue
    raise AssertionError(f"no test value for {flag}")


UNREAD = [(verb, mode, flag) for (verb, mode) in MODE_ARGV
          for flag in sorted({f for _, fs in MODE_FLAGS[verb].values() for f in fs} - set(MODE_FLAGS[verb][mode][1]))]


@pytest.mark.parametrize("verb, mode, flag", UNREAD, ids=[f"{v}-{m}{f}" for v, m, f in UNREAD])
def test_a_flag_the_mode_does_not_read_is_refused(verb, mode, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [*MODE_ARGV[verb, mode].format(O=tmp_path / "out").split(), flag, *_value(verb, flag)]
    capsys.readouterr()
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tdm-fast: error: "), lines
    args = _parse(argv)
    # a flag that selects another mode (--preset, --pipeline): the first flag of the mode's own argv is refused
    named = flag if mode_of(verb, args) == mode else MODE_ARGV[verb, mode].split()[len(verb.split())]
    assert f"{named} does nothing in" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb, mode", list(MODE_ARGV), ids=[f"{v}-{m}" for v, m in MODE_ARGV])
def test_the_flags_a_mode_reads_are_not_refused(verb, mode, tmp_path):
    argv = MODE_ARGV[verb, mode].format(O=tmp_path / "out").split()
    for flag in MODE_FLAGS[verb][mode][1]:
        longer = argv + ([flag, *_value(verb, flag)] if flag not in argv else [])
        if mode_of(verb, _parse(longer)) == mode:  # --full-finetune selects the other mode
            argv = longer
    assert len(set(argv) & set(MODE_FLAGS[verb][mode][1])) >= len(MODE_FLAGS[verb][mode][1]) - 1
    refuse_unread_flags(verb, _parse(argv), _verb_parser(verb), argv)


@pytest.mark.parametrize("verb", sorted(MODE_FLAGS))
def test_every_verb_with_modes_says_which_mode_it_runs(verb, tmp_path):
    """mode_of answers every verb of the table (a verb added to the table without its mode rule would be skipped)."""
    argv = next(argv for (v, _), argv in MODE_ARGV.items() if v == verb).format(O=tmp_path / "out").split()
    assert mode_of(verb, _parse(argv)) in MODE_FLAGS[verb]
