"""The GPU kit (benchmarks/gpu/run.sh) works before a GPU appears: its dry run runs every stage on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import kit  # noqa: E402


@pytest.mark.xdist_group("gpu_kit")
def test_dry_run_runs_every_stage_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert proc.stdout.strip().endswith(report.strip().splitlines()[-1])  # the report is printed last
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True
    for stage in "ABCD":
        assert results["stages"][stage]["status"] == "ok", (stage, results["stages"][stage].get("error"))
        assert f"stage {stage}: ok" in report
    a, b, c, d = (results["stages"][s] for s in "ABCD")
    assert a["missing_features"] == [] and "all present" in report
    assert a["matmul"]["tflops"] > 0 and a["copy"]["gb_per_s"] > 0 and a["versions"]["torch"]
    assert "skipped" in a["pytest_gpu"]["summary"] and a["pytest_gpu"]["rc"] == 0  # no GPU here: all skip
    impls = {(r["impl"], r["mode"]) for r in b["results"]}
    assert impls == {("vitkit", "infer"), ("vitkit", "train"), ("timm", "infer"), ("timm", "train")}
    assert all(r["images_per_s"] > 0 for r in b["results"]) and b["cifar_model_train_images_per_s"] > 0
    assert c["cifar_jpeg_loader_images_per_s"] > 0 and c["large_jpeg_loader_images_per_s"] > 0
    assert c["large_jpegs"]["count"] == 64 and c["e2e_train_images_per_s"] > 0 and c["e2e_over_synthetic"] > 0
    assert d["rc"] == 0 and d["points"] and d["points"][-1]["elapsed_s"] > 0 and 0 <= d["best_top1"] <= 100
    # every target is listed, none judged from a dry run's tiny sizes
    assert set(results["targets"].values()) == {"not measured"} and len(results["targets"]) == 10


def test_a_stage_that_fails_is_reported_and_the_next_still_runs(tmp_path: Path, monkeypatch) -> None:
    def no_device(rec, data, dry, out):
        rec["device"] = "half-measured"
        raise RuntimeError("no such device")

    monkeypatch.setitem(kit.STAGES, "A", no_device)
    kit.run_stage("A", tmp_path, tmp_path, True)
    rec = json.loads((tmp_path / "stage_A.json").read_text())
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: no such device"
    assert rec["device"] == "half-measured"  # what it measured before failing is kept
    assert "RuntimeError" in (tmp_path / "stage_A.traceback.txt").read_text()
    text, results = kit.report(tmp_path, True, "bash benchmarks/gpu/run.sh --dry-run")
    assert "stage A: failed" in text and "stage B: did not run" in text and results["stages"]["A"]["status"] == "failed"


def test_a_stage_killed_at_its_limit_keeps_what_it_measured(tmp_path: Path) -> None:
    rc, _ = kit.run_cmd([sys.executable, "-c", "import time; print('x', flush=True); time.sleep(30)"], 1)
    assert rc is None  # killed at the limit, process group and all


def test_a_missing_library_feature_is_named(monkeypatch) -> None:
    monkeypatch.setattr(kit, "FEATURES", ["torch.nn.attention:sdpa_kernel", "torch:no_such_api", "no_such_module:x"])
    missing = kit.missing_features()
    assert [m.split(" ")[0] for m in missing] == ["torch.no_such_api", "no_such_module.x"]


def test_cifar_epoch_plan_fits_the_budget() -> None:
    budget = kit.BUDGET_S["D"] - 10
    assert kit.plan_epochs(None, budget) == 10
    assert kit.plan_epochs(1_000, budget) == 5  # slow GPU: the floor
    assert kit.plan_epochs(20_000, budget) == int((budget - 75) * 0.85 * 20_000 / 50_000)  # ~100 s of training
    assert kit.plan_epochs(10**7, budget) == 100
    assert sum(kit.BUDGET_S.values()) <= 510  # with install and unpack, the whole run ends within 9 minutes
