"""The last line of make demo: the run's AP beside the range the README documents."""

import json
import sys

from training_runs import REPO

sys.path.insert(0, str(REPO / "tools"))

import demo_result  # noqa: E402


def _run(tmp_path, aps):
    records = [{"iteration": 19, "total_loss": 9.0}, {"iteration": 399, **aps}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(tmp_path)


def test_line_says_whether_the_run_is_inside_the_documented_range(tmp_path):
    for host, documented in demo_result.DOCUMENTED.items():
        medians = {f"{task}/AP": mid for task, (_, mid, _) in documented.items()}
        line = demo_result.result_line(_run(tmp_path, medians), host)
        assert line.startswith("Demo result: box / mask / keypoint AP ")
        assert line.endswith("inside.")
        assert f"Detectron2 {host}" in line
        low = {**medians, "segm/AP": documented["segm"][0] - 1}
        assert demo_result.result_line(_run(tmp_path, low), host).endswith("OUTSIDE the range.")


def test_documented_ranges_are_the_readmes():
    readme = (REPO / "README.md").read_text()
    for host, documented in demo_result.DOCUMENTED.items():
        label = f"{host} (`{demo_result.HOST_TARGETS[host]}`)"
        medians = [str(mid) for _, mid, _ in documented.values()]
        assert f"| {label} | median over seeds 0-4 | {' | '.join(medians)} |" in readme, host
        cells = [f"{lo}-{hi}" for lo, _, hi in documented.values()]
        assert f"| | range | {' | '.join(cells)} |" in readme, host
