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
                                         (("eval", "--help"), "--quick"),
                                         (("demo", "--help"), "--budget SHARE"),
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
                                         (("eval", "--layers", "fastv=two"), "argument --layers: expected integer"),
                                         (("eval", "--quick", "--n", "5"), "argument --n: not allowed with argument --quick"),
                                         (("demo", "--budget", "48"), "argument --budget: expected a share of the visual "
                                                                      "tokens in (0, 1] such as 0.333 (a share, not a token count)"),
                                         (("--budget", "-1"), "argument --budget: expected a share")])
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


def test_a_budget_no_method_can_spend_is_one_line_naming_the_option():
    code, out, err = cli("demo", "--budget", "0.05")
    assert code == 1 and not out and err.count("\n") == 1
    assert err.startswith("python -m swiftvlm_kernels demo: error: --budget 0.05: SwiftVLM, FastV, PDrop, ALVTS cannot spend it")
