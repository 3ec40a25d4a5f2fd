"""fotlab benchmarks: side-by-side performance comparisons, each case in a fresh subprocess.

Run: `python -m benchmarks` (everything, full sizes), `python -m benchmarks prefill retrieval --repeats 5`,
`python -m benchmarks --size tiny` (seconds: a smoke run), `--json results.json` to keep the numbers.

Modules: `runner` (cases, subprocesses, medians, ratio table), `prefill`, `train_step`, `retrieval`,
`overhead`, `growth` (one benchmark each), `longllama_ref` (`prefill_longllama`: fotlab against the public
LongLLaMA code on one checkpoint; needs `--longllama-code DIR --longllama-python PY`), `models` (the shared
benchmark model shapes), `naive` (a straightforward memory-attention implementation used as the speed
reference). Not part of the test run.
"""
