"""A pytest plugin for bitsandbytes' own test suite run against our backend plugin
(scripts/bnb_peer_tests.sh loads it with -p): at the end of the session it writes what the
plugin handled (qlora_kernels.integrations.bitsandbytes.status(): our ops, calls, fallbacks
to bitsandbytes' default kernels) and the pass/fail counts to the JSON file named by
QK_BNB_REPORT."""
from __future__ import annotations

import json
import os

_COUNTS: dict[str, int] = {}


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _COUNTS[report.outcome] = _COUNTS.get(report.outcome, 0) + 1


def pytest_sessionfinish(session, exitstatus):
    import bitsandbytes  # noqa: F401  (loads the plugin if it is on)
    from qlora_kernels.integrations import bitsandbytes as plugin

    status = plugin.status()
    status["fallbacks"] = {f"{op}: {why}": n for (op, why), n in status["fallbacks"].items()}
    out = {"outcomes": _COUNTS, "exitstatus": int(exitstatus), "plugin": status}
    path = os.environ.get("QK_BNB_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, sort_keys=True)
