"""The nsa-dsl command line: exit codes, diagnostics, explain, emit, cache,
verify."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nsa_dsl
from nsa_dsl.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


WINDOW_SPEC = "pattern {name} {{ heads q=2 kv=1 dims qk=16 window size=4 }}\n"


def with_stdin(monkeypatch, data: bytes) -> None:
    """Standard input as a real process has it: text over a byte buffer."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="ascii"))


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"nsa-dsl {nsa_dsl.__version__}\n"


def test_check_reads_the_spec_from_stdin(capsys, monkeypatch):
    with_stdin(monkeypatch, WINDOW_SPEC.format(name="piped").encode())
    code, out, _ = run(capsys, "check", "-")
    assert code == 0 and out.startswith("<stdin>: pattern piped: ok")


def test_stdin_diagnostics_name_stdin(capsys, monkeypatch):
    with_stdin(monkeypatch, b"pattern p {\n    heads q=3 kv=2\n    dims qk=16\n    window size=4\n}\n")
    code, _, err = run(capsys, "check", "-")
    assert code == 1 and "<stdin>:2:" in err and "multiple of heads.kv" in err
    # Bytes that are not UTF-8 (the locale's encoding is ascii here: ignored,
    # as for spec files) are an error about the spec, not a traceback.
    with_stdin(monkeypatch, b"pattern \xff { }\n")
    code, _, err = run(capsys, "check", "-")
    assert code == 1 and err.startswith("<stdin>: error: cannot read spec")
    with_stdin(monkeypatch, "pattern caf\u00e9 { }\n".encode())  # UTF-8, yet not ascii: read, then rejected by the grammar
    code, _, err = run(capsys, "check", "-")
    assert code == 1 and "<stdin>:1:" in err


def test_emit_and_verify_read_stdin(tmp_path, capsys, monkeypatch):
    with_stdin(monkeypatch, WINDOW_SPEC.format(name="piped").encode())
    code, out, _ = run(capsys, "emit", "-", "-o", str(tmp_path))
    assert code == 0
    assert "# source     <stdin>" in (tmp_path / "piped_nsa.py").read_text()
    seen = fake_verify(monkeypatch)
    with_stdin(monkeypatch, WINDOW_SPEC.format(name="piped").encode())
    code, _, _ = run(capsys, "verify", "-", "--examples", "2")
    assert code == 0 and [p.name for p in seen] == ["piped"]


def spec_folder(tmp_path) -> Path:
    """b.nsa, a.nsa and two files a folder argument must skip: one in a
    subfolder and a hidden one; and a non-spec file."""
    folder = tmp_path / "specs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.nsa").write_text(WINDOW_SPEC.format(name="bee"))
    (folder / "a.nsa").write_text(WINDOW_SPEC.format(name="ay") + WINDOW_SPEC.format(name="ay2"))
    (folder / "sub" / "c.nsa").write_text(WINDOW_SPEC.format(name="deep"))
    (folder / ".d.nsa").write_text(WINDOW_SPEC.format(name="hidden"))
    (folder / "notes.txt").write_text("not a spec")
    return folder


def test_check_a_folder_reads_its_nsa_files_sorted_not_recursively(tmp_path, capsys):
    folder = spec_folder(tmp_path)
    code, out, _ = run(capsys, "check", str(folder))
    assert code == 0
    assert out.splitlines() == [f"{folder / 'a.nsa'}: pattern ay: ok", f"{folder / 'a.nsa'}: pattern ay2: ok",
                                f"{folder / 'b.nsa'}: pattern bee: ok"]
    code, out, _ = run(capsys, "check", str(folder), "--name", "bee")
    assert code == 0 and out.splitlines() == [f"{folder / 'b.nsa'}: pattern bee: ok"]
    code, _, err = run(capsys, "check", str(folder), "--name", "deep")
    assert code == 2 and f"no pattern named deep in folder {folder}" in err
    code, _, err = run(capsys, "check", str(folder / "sub" / ".."), str(tmp_path))
    assert code == 2 and f"no .nsa files in folder {tmp_path}" in err


def test_emit_a_folder_writes_every_pattern(tmp_path, capsys):
    folder = spec_folder(tmp_path)
    code, _, _ = run(capsys, "emit", str(folder), "-o", str(tmp_path / "out"))
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ay2_nsa.py", "ay_nsa.py", "bee_nsa.py"]
    code, _, _ = run(capsys, "emit", str(folder), "--name", "bee", "-o", str(tmp_path / "one"))
    assert code == 0 and [p.name for p in (tmp_path / "one").iterdir()] == ["bee_nsa.py"]


def test_emit_a_folder_with_a_bad_spec_names_it_and_writes_nothing(tmp_path, capsys):
    folder = spec_folder(tmp_path)
    (folder / "worse.nsa").write_text("pattern worse {\n")
    (folder / "wrong.nsa").write_text("pattern wrong {\n heads q=3 kv=2 dims qk=16 window size=4 }\n")
    code, _, err = run(capsys, "emit", str(folder), "-o", str(tmp_path / "out"))
    assert code == 1 and "worse.nsa:1:15: error:" in err and "wrong.nsa" not in err  # unparsed: nothing checked
    assert not (tmp_path / "out").exists()
    (folder / "worse.nsa").unlink()
    (folder / "wronger.nsa").write_text("pattern wronger {\n heads q=5 kv=2 dims qk=16 window size=4 }\n")
    code, _, err = run(capsys, "emit", str(folder), "-o", str(tmp_path / "out"))
    assert code == 1 and "wrong.nsa:2:" in err and "wronger.nsa:2:" in err  # every invalid pattern
    assert not (tmp_path / "out").exists()  # and the valid ones of a.nsa and b.nsa not written either


def test_emit_refuses_two_patterns_of_one_name_in_a_folder(tmp_path, capsys):
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "a.nsa").write_text(WINDOW_SPEC.format(name="same"))
    (folder / "b.nsa").write_text(WINDOW_SPEC.format(name="same"))
    code, _, err = run(capsys, "emit", str(folder), "-o", str(tmp_path / "out"))
    assert code == 2 and "would both be written to" in err and "a.nsa" in err and "b.nsa" in err


def test_emit_a_file_whose_name_is_not_utf8(tmp_path, capsys):
    spec = tmp_path / os.fsdecode(b"bad\xff.nsa")
    spec.write_text(WINDOW_SPEC.format(name="w"))
    code, out, _ = run(capsys, "emit", str(spec), "-o", str(tmp_path / "out"))
    assert code == 0, out
    source = (tmp_path / "out" / "w_nsa.py").read_text()
    assert "# source     " in source and "bad?.nsa" in source
    compile(source, "w_nsa.py", "exec")


def test_emit_bounds_the_file_name_of_a_long_pattern_name(tmp_path, capsys):
    spec = tmp_path / "long.nsa"
    spec.write_text(WINDOW_SPEC.format(name="a" * 300) + WINDOW_SPEC.format(name="a" * 299 + "b"))
    code, _, err = run(capsys, "emit", str(spec), "-o", str(tmp_path / "out"))
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(names) == 2  # two long names sharing a beginning: two files
    assert all(len(n) <= 100 and n.startswith("a" * 50) and n.endswith("_nsa.py") for n in names)


def test_emitted_files_cannot_shadow_modules(tmp_path, capsys):
    spec = tmp_path / "clash.nsa"
    spec.write_text("".join(WINDOW_SPEC.format(name=n) for n in ("triton", "tl", "__init__")))
    code, _, err = run(capsys, "emit", str(spec), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["__init___nsa.py", "tl_nsa.py", "triton_nsa.py"]


def test_emit_to_a_file_is_a_usage_error(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    code, _, err = run(capsys, "emit", str(EXAMPLES / "window_only.nsa"), "-o", str(afile))
    assert code == 2 and f"-o {afile} is a file" in err
    code, _, err = run(capsys, "emit", str(EXAMPLES / "window_only.nsa"), "-o", str(afile / "sub"))
    assert code == 2 and "cannot create output folder" in err
    assert afile.read_text() == "keep me"


def test_check_valid_examples_exit_zero(capsys):
    code, out, _ = run(capsys, "check", str(EXAMPLES / "deepseek_nsa.nsa"), str(EXAMPLES / "moba_like.nsa"),
                       str(EXAMPLES / "window_only.nsa"))
    assert code == 0
    assert "pattern deepseek_nsa: ok" in out and "pattern moba_like: ok" in out


def test_check_reports_every_violation_with_caret(tmp_path, capsys):
    spec = tmp_path / "bad.nsa"
    spec.write_text("pattern bad {\n    heads q=64 kv=5\n    dims qk=40\n    compress block=32 stride=16\n"
                    "    select block=40 top=16\n}\n")
    code, _, err = run(capsys, "check", str(spec))
    assert code == 1
    # Independent violations, all reported in one run, each located.
    assert f"{spec}:2:19: error: heads.q must be a multiple of heads.kv" in err
    assert f"{spec}:3:13: error: dims.qk must be a multiple of 16" in err
    assert f"{spec}:5:18: error: select.block must be a power of two" in err
    assert "    dims qk=40\n" + " " * (4 + 12) + "^^" in err


def test_check_syntax_error_exit_one(tmp_path, capsys):
    spec = tmp_path / "syntax.nsa"
    spec.write_text("pattern p {\n    heads q=4 kv=2\n    dims qk=64\n    window sise=8\n}\n")
    code, _, err = run(capsys, "check", str(spec))
    assert code == 1
    assert "syntax.nsa:4:12" in err and "did you mean 'size'" in err


def test_usage_errors_exit_two(tmp_path, capsys):
    code, _, err = run(capsys, "check", str(tmp_path / "missing.nsa"))
    assert code == 2 and "no such file" in err
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["check"])
    assert exc.value.code == 2


def test_explain_prints_kernels_and_cost_model(capsys):
    code, out, _ = run(capsys, "check", "--explain", str(EXAMPLES / "deepseek_nsa.nsa"))
    assert code == 0
    for kernel in ("cmp_fwd", "slc_topk", "slc_fwd", "swa_fwd", "combine", "slc_bwd"):
        assert f"- {kernel} (" in out
    assert "group-centric" in out
    assert "dense causal attention" in out
    assert "65536" in out  # the ratio table reaches 64k


def test_explain_window_only_has_one_attention_kernel(capsys):
    code, out, _ = run(capsys, "check", "--explain", str(EXAMPLES / "window_only.nsa"))
    assert code == 0
    forward = [line for line in out.splitlines() if "(forward)" in line]
    assert [line.split()[1] for line in forward] == ["swa_fwd", "combine"]


def test_emit_writes_readable_source(tmp_path, capsys):
    code, out, _ = run(capsys, "emit", str(EXAMPLES / "moba_like.nsa"), "-o", str(tmp_path))
    assert code == 0
    source = (tmp_path / "moba_like_nsa.py").read_text()
    assert source.startswith("# Generated by nsa_dsl")
    assert "# pattern    moba_like" in source and str(EXAMPLES / "moba_like.nsa") in source
    assert "TOP: tl.constexpr = tl.constexpr(8)" in source
    compile(source, "moba_like.py", "exec")  # valid Python


def test_cache_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))
    code, out, _ = run(capsys, "cache", "path")
    assert code == 0 and out.strip() == str(tmp_path / "cache")
    import nsa_dsl

    nsa_dsl.compile(nsa_dsl.load(EXAMPLES / "window_only.nsa"))
    code, out, _ = run(capsys, "cache", "list")
    assert code == 0 and "1 entry" in out and " ok " in out
    code, out, _ = run(capsys, "cache", "clear")
    assert code == 0 and "removed 1" in out
    code, out, _ = run(capsys, "cache", "list")
    assert "0 entries" in out


def test_cache_list_names_each_entrys_pattern_and_kernels(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))
    compiled = nsa_dsl.compile(nsa_dsl.load(EXAMPLES / "window_only.nsa"))
    code, out, _ = run(capsys, "cache", "list")
    assert code == 0
    first, second = out.splitlines()[:2]
    assert first.startswith(f"{compiled.cache_key[:16]}  window_only ")
    assert second.strip() == (f"kernels: {', '.join(compiled.plan.kernel_names)};"
                              f" source: {EXAMPLES / 'window_only.nsa'}")
    # An entry without a header (not ours, or damaged) is listed, not a crash.
    compiled.source_path.write_text("x = 1\n")
    code, out, _ = run(capsys, "cache", "list")
    assert code == 0 and " ?  " in out and "CORRUPT" in out and "(no header" in out


@pytest.mark.parametrize("action", ["path", "list", "clear"])
def test_cache_commands_report_a_cache_dir_that_is_a_file(tmp_path, capsys, monkeypatch, action):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(afile))
    code, out, err = run(capsys, "cache", action)
    assert code == 2
    assert f"{afile} is a file, not a folder" in err and "NSA_DSL_CACHE_DIR" in err
    assert "entries" not in out and "removed" not in out


def test_cache_commands_report_a_read_only_cache_dir(tmp_path, capsys, monkeypatch):
    from test_cache import read_only

    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))
    nsa_dsl.compile(nsa_dsl.load(EXAMPLES / "window_only.nsa"))
    read_only(monkeypatch, tmp_path / "cache")
    code, out, err = run(capsys, "cache", "list")
    assert code == 2 and "1 entry" in out  # what it holds is still listed
    assert f"{tmp_path / 'cache'} is not writable" in err and "cannot take new entries" in err
    code, out, err = run(capsys, "cache", "clear")
    assert code == 2 and "removed" not in out and "is not writable" in err
    assert len(list((tmp_path / "cache").glob("??/*.py"))) == 1


def test_verify_with_an_unusable_cache_dir_is_a_usage_error(tmp_path, capsys, monkeypatch):
    # verify compiles first: the cache error comes before any case runs.
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "afile"))
    code, _, err = run(capsys, "verify", str(EXAMPLES / "window_only.nsa"), "--examples", "1")
    assert code == 2 and err.startswith("nsa-dsl verify: cannot use the nsa_dsl kernel cache folder")
    assert "NSA_DSL_CACHE_DIR" in err


def fake_verify(monkeypatch):
    """Replace the interpreter-bound verify with one that reports its cases
    through the progress hook and prints as verify does; returns the
    patterns it was called with."""
    import nsa_dsl.verify as verify_mod

    seen = []

    def verify(pattern, *, examples, seed, grad, max_length, out=print, progress=None):
        seen.append(pattern)
        for number in range(1, examples + 1):
            progress(number, examples)
        out(f"pattern {pattern.name}: OK")
        return True
    monkeypatch.setattr(verify_mod, "verify", verify)
    return seen


class TerminalErr(io.StringIO):
    def isatty(self):
        return True


def test_verify_shows_progress_on_a_terminal(capsys, monkeypatch):
    fake_verify(monkeypatch)
    terminal = TerminalErr()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = main(["verify", str(EXAMPLES / "window_only.nsa"), "--examples", "3"])
    assert code == 0
    shown = terminal.getvalue()
    for number in (1, 2, 3):
        assert f"\r\x1b[Knsa-dsl verify: window_only: case {number}/3, " in shown
    assert shown.endswith("\r\x1b[K")  # the line is erased before the report and at the end
    assert capsys.readouterr().out == "pattern window_only: OK\n"


def test_verify_is_silent_on_stderr_that_is_not_a_terminal(capsys, monkeypatch):
    fake_verify(monkeypatch)
    code, out, err = run(capsys, "verify", str(EXAMPLES / "window_only.nsa"), "--examples", "3")
    assert code == 0 and err == "" and out == "pattern window_only: OK\n"


def test_verify_passes_on_window_only(capsys):
    code, out, _ = run(capsys, "verify", str(EXAMPLES / "window_only.nsa"), "--examples", "3", "--max-length", "40")
    assert code == 0, out
    assert "3 case(s)" in out and "OK" in out


def test_verify_grad_on_a_small_pattern(tmp_path, capsys):
    spec = tmp_path / "small.nsa"
    spec.write_text("pattern small {\n heads q=4 kv=2\n dims qk=16\n compress block=8 stride=4\n"
                    " select block=16 top=3 initial=1 local=1\n window size=9\n dtype fp32\n}\n")
    code, out, _ = run(capsys, "verify", str(spec), "--examples", "2", "--grad", "--max-length", "40")
    assert code == 0, out
    assert "dq" in out and "dk" in out and "cmp" in out


def test_verify_exits_one_and_prints_shrunk_case_when_kernels_disagree(tmp_path, capsys, monkeypatch):
    import nsa_dsl.verify as verify_mod

    spec = tmp_path / "w.nsa"
    spec.write_text("pattern w { heads q=2 kv=1 dims qk=16 window size=4 dtype fp32 }\n")
    real = verify_mod.reference

    def wrong_reference(pattern, **kwargs):  # a reference that disagrees with every kernel result
        return real(pattern, **kwargs) * 1.5

    monkeypatch.setattr(verify_mod, "reference", wrong_reference)
    code, out, _ = run(capsys, "verify", str(spec), "--examples", "10", "--max-length", "12")
    assert code == 1
    # Hypothesis shrinks the failure to the smallest case.
    assert "FAILED (shrunk case): batch=1 length=1 dtype=float32 seed=0" in out


def test_console_script_entry_point_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "nsa_dsl.cli", "check", str(EXAMPLES / "window_only.nsa")],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "window_only: ok" in result.stdout
