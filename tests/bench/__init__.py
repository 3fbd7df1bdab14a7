"""The benchmarks and the long soak: not tests (pytest never collects tests/bench).

Each one is a module of this package, importing `bench.common` and `support` as
packages; nothing edits `sys.path`. Run them from the repository's root with tests/ on
the path, which is what `make bench` does for `bench.run_all`:

    PYTHONPATH=tests python -m bench.run_all [--quick]
    PYTHONPATH=tests python -m bench.soak --seconds 300

`python -m` puts the current directory first on the path, so `gateway` is this
checkout's; the processes a bench starts inherit both. `--help` on any of them lists its
options.
"""
