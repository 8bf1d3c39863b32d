"""The tooling around the kernels and the model, apart from the product packages.

Benchmarks (``bench/test_bench_*.py``, run by pytest) and the command-line tools::

    python -m bench.profile <target>       one kernel or the encoder under ncu / nsys, with its roofline (GPU)
    python -m bench.inspect --arch 90      compile every shipped kernel config for sm_90; no GPU needed
    python -m bench.tune <target>          sweep launch configurations against the shipped one
    python -m bench.gpu_suite              ceilings, tests and benchmarks on a GPU, in one report

``bench.timing`` (CUDA-event timing, measured ceilings, the environment record), ``bench.harness``
(pytest-benchmark helpers) and ``bench.compile`` (static compilation) are the library side of these.
Nothing in ``penguin_kernels`` or ``penguin_vl`` imports this package.
"""
