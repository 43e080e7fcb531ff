"""The command line: subcommands with their own --help, one-line errors, exit statuses."""
import subprocess
import sys

import pytest


def cli(*args):
    run = subprocess.run([sys.executable, "-m", "swiftvlm_kernels", *args], capture_output=True, text=True,
                         timeout=300)
    return run.returncode, run.stdout, run.stderr


@pytest.mark.parametrize("args, words", [(("--help",), "Subcommands: demo (the default), eval, calibrate, ops"),
                                         (("demo", "--help"), "--new-tokens"),
                                         (("eval", "--help"), "--budgets"),
                                         (("calibrate", "--help"), "--rank"),
                                         (("ops", "--help"), "--backend")])
def test_help(args, words):
    code, out, err = cli(*args)
    assert code == 0 and words in out.replace("\n", " ") and not err


@pytest.mark.parametrize("args, words", [(("bogus",), "invalid choice: 'bogus'"),
                                         (("demo", "--bogus"), "unrecognized arguments: --bogus"),
                                         (("demo", "--batch", "0"), "argument --batch: expected an int >= 1, got 0"),
                                         (("ops", "--backend", "nonsense"), "expected one of auto, torch, cpu"),
                                         (("eval", "--budgets", "0.5,2"), "argument --budgets: expected shares in (0, 1]"),
                                         (("eval", "--methods", "fastv,magic"), "argument --methods: expected names"),
                                         (("eval", "--layers", "fastv=two"), "argument --layers: expected integer")])
def test_usage_errors_exit_2_with_one_line(args, words):
    code, out, err = cli(*args)
    assert code == 2 and err.count("\n") == 1 and words in err and not out


def test_unavailable_backend_says_why_in_one_line():
    code, out, err = cli("ops", "--backend", "cuda")
    assert code == 1 and err.count("\n") == 1
    assert "--backend cuda: not available on cpu tensors here: the cuda backend needs CUDA tensors" in err


def test_debug_shows_the_traceback():
    code, out, err = cli("ops", "--backend", "cuda", "--debug")
    assert code == 1 and "Traceback" in err and "ValueError" in err


def test_ops_runs():
    code, out, err = cli("ops", "--backend", "cpu")
    assert code == 0 and "score_select: B=2" in out and "mean offset 0.500" in out
