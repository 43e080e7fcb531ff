"""`python -m swiftvlm_kernels demo` on the tiny model."""
from swiftvlm_kernels.demo import main


def test_demo_prints_stages_flops_and_tokens(capsys):
    assert main(["--new-tokens", "3", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    for text in ("SwiftVLM:", "FastV:", "PDrop:", "stage 1, layer 3: keep 5, merge the rest into 2",
                 "stage 3, layer 15: keep 5, drop the rest", "% of vanilla", "greedy output ids (3 new tokens"):
        assert text in out, text
    rows = [line.split() for line in out.splitlines() if line.startswith("  vanilla ")]
    assert len(rows) == 1 and "(6/6" in rows[0]  # vanilla equals itself on 2 samples x 3 tokens
