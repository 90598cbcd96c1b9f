"""Every command-line input is checked before work (issue 33): output paths that cannot be written, plan field
typos with the allowed names, and argument errors reported without importing the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffusers_unlearn.cli import main
from diffusers_unlearn.plan import PlanError, parse_plan


@pytest.mark.parametrize("command", [
    ["unlearn", "tiny", "--concept", "cat", "--out"],
    ["fold", ".", "--out"],
    ["demo", "--out"],
    ["bench", "--quick", "--out"],
])
def test_an_output_path_that_cannot_be_made_is_refused_before_any_work(command, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main([*command, str(blocker / "x2")]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'x2'}: the folder cannot be created, {blocker} is not a folder" in err
    assert main([*command, str(blocker)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_audit_output_must_be_a_writable_png(tmp_path, capsys):
    assert main(["audit", str(tmp_path), "--request", "r0001", "--prompt", "a cat", "--out", str(tmp_path)]) == 2
    assert "--out must be a .png file" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["audit", str(tmp_path), "--request", "r0001", "--prompt", "a cat", "--out", str(blocker / "a.png")]) == 2
    assert "the file cannot be created" in capsys.readouterr().err


def test_a_plan_typo_lists_the_allowed_fields_and_the_nearest(tmp_path):
    with pytest.raises(PlanError) as caught:
        parse_plan({"model": "tiny", "output": str(tmp_path / "o"), "requests": [{"concept": "cat", "stpes": 5}]})
    message = str(caught.value)
    assert "request 1 ('cat'): unknown field(s) ['stpes']" in message
    assert "'stpes': did you mean 'steps'?" in message
    assert " steps, " in message and "negative_guidance" in message  # request keys and the method's options
    with pytest.raises(PlanError, match="'negativ_guidance': did you mean 'negative_guidance'"):
        parse_plan({"model": "tiny", "output": str(tmp_path / "o"), "defaults": {"method": "esd"},
                    "requests": [{"concept": "cat", "negativ_guidance": 2}]})
    # a real option of the method is not a typo
    plan = parse_plan({"model": "tiny", "output": str(tmp_path / "o"),
                       "requests": [{"concept": "cat", "method": "esd", "steps": 5, "negative_guidance": 2}]})
    assert plan.requests[0].method_options == {"negative_guidance": 2}


def test_an_argument_error_imports_no_heavy_library(tmp_path):
    # the error must come at --help's speed: no torch, diffusers or transformers (a fresh process; no timing)
    code = (
        "import sys\n"
        "from diffusers_unlearn.cli import main\n"
        f"assert main(['unlearn', 'minicanvas', '--concept', 'x', '--out', {str(tmp_path / 'f' / 'x')!r}]) == 2\n"
        f"assert main(['fold', {str(tmp_path / 'missing')!r}]) == 2\n"
        "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))\n"
    )
    (tmp_path / "f").write_text("a file")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stdout
    assert "the folder cannot be created" in result.stderr and "does not exist or is not a folder" in result.stderr


HEAVY = ("torch", "diffusers", "transformers", "peft")


def _cli_in_a_fresh_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``diffusers-unlearn ARGV`` in a fresh process, which then prints the heavy libraries it imported (this test
    process has them loaded already). The imports are what makes an error slow; no timing."""
    code = ("import sys\n"
            "from diffusers_unlearn.cli import main\n"
            f"status = main({argv!r})\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules), 'STATUS', status)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_a_plan_typo_is_refused_without_importing_the_engine(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: tiny\noutput: out\nrequests:\n  - {concept: cat, stpes: 5}\n"
                    "  - {concept: dog, method: esd, negativ_guidance: 2}\n")
    result = _cli_in_a_fresh_process(["run", str(plan)])
    assert "HEAVY [] STATUS 2" in result.stdout, result.stderr[-2000:]
    assert "request 1 ('cat'): unknown field(s) ['stpes'] ('stpes': did you mean 'steps'?)" in result.stderr
    assert "options of its method 'closed_form': sampling_steps," in result.stderr  # the default method's
    plan.write_text("model: tiny\noutput: out\nrequests:\n  - {concept: dog, method: esd, negativ_guidance: 2}\n")
    result = _cli_in_a_fresh_process(["run", str(plan)])
    assert "HEAVY [] STATUS 2" in result.stdout, result.stderr[-2000:]
    assert "'negativ_guidance': did you mean 'negative_guidance'?" in result.stderr
    assert "options of its method 'esd'" in result.stderr


def test_a_misspelled_minicanvas_concept_is_refused_without_importing_the_engine(tmp_path):
    result = _cli_in_a_fresh_process(["unlearn", "minicanvas", "--concept", "neon line", "--domain", "style",
                                      "--out", str(tmp_path / "out")])
    assert "HEAVY [] STATUS 2" in result.stdout, result.stderr[-2000:]
    assert "'neon line' is not a minicanvas style: did you mean 'neon lines'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_cli_reads_the_registry_s_method_options_from_the_source():
    # run checks plan fields with option names read from objectives/ (no torch); they must be the registry's
    from diffusers_unlearn.cli._common import method_option_names
    from diffusers_unlearn.objectives import OBJECTIVES
    from diffusers_unlearn.plan import _method_fields

    read = method_option_names()
    assert sorted(read) == sorted(OBJECTIVES)
    # the same names (fields and the former names still taken), in any order
    assert {method: sorted(read[method]) for method in OBJECTIVES} == \
        {method: sorted(_method_fields(method)) for method in OBJECTIVES}
