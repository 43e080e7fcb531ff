"""The applications built on the library: the command line (`cli.py`, run by `python -m
swiftvlm_kernels`), the demo (`demo.py`), the evaluation (`evaluation/`), the synthetic VQA task
(`synth.py`), PNG files and pictures (`png.py`, `figures.py`) and the embedded trained tiny LLaVA
(`trained.py`, its weights in `weights/tiny-vqa/`).

They use the integrations (`swiftvlm_kernels.pruning`, `models`, `hf`) and the ops; nothing below
imports from here.
"""
