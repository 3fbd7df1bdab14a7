"""A short soak in the suite: 50 clients on every route and team through two replicas.

The same run as `tests/bench/soak.py` (its docstring lists what the clients do and
what is checked), sized for a 2-core machine that runs the rest of the suite too: 12 s
of load, then the drain and the final accounting. Only correctness is asserted, never a
time: every answer as its request must get and no 5xx, nothing lost (every created video
in its team's list, every upstream job known to the gateway and counted once), the
slots back to 0, and per replica no growth of open file descriptors (less the clients'
own connections) or threads beyond a small margin, and the asyncio task count back to
its idle level. RSS, all fds and the task count under load are reported in the failure
message, not asserted.
"""

from __future__ import annotations

from pathlib import Path

from bench import soak

SHORT = soak.SoakConfig(
    seconds=12,
    clients=50,
    think_s=0.5,
    sample_s=0.5,
    idle_s=1.5,
    settle_s=1.0,
    drain_s=20.0,
    fd_margin=16,
    enforce_all_fds=False,  # with the clients' own connections, which the clients drive
    enforce_rss=False,
    enforce_task_growth=False,
)


def test_a_short_soak_answers_right_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    result = soak.run_soak(SHORT, workdir=tmp_path, say=lambda text: None)
    failed = [check["name"] for check in result["checks"] if check["enforced"] and not check["ok"]]
    assert not failed, f"failed: {failed}\n{soak.table(result)}"
    # The run did exercise what it checks.
    assert result["jobs"]["started"] > 0, soak.table(result)
    assert result["jobs"]["deleted"] > 0, soak.table(result)
    assert result["characters"] > 0, soak.table(result)
    assert result["requests"] > 300, soak.table(result)
