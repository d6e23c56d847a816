"""The benchmarks' own logic, on CPU: the batch search, the jobs they build, the profiler's phase split."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import memory  # noqa: E402
import plain  # noqa: E402
import profile_step  # noqa: E402
import train_throughput  # noqa: E402


@pytest.mark.parametrize("limit", [1, 300, 512, 700, 5000, 32767, 100000])
def test_largest_fitting_batch_is_found_to_within_a_sixteenth(limit):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= limit

    best = memory.largest_fitting(fits, 512, 32768)
    want = min(limit, 32768)
    assert best <= want and want - best <= max(1, best // 16), (best, want)
    assert all(c <= 32768 for c in calls) and len(calls) <= 20


def test_largest_fitting_is_zero_when_nothing_fits():
    assert memory.largest_fitting(lambda b: False, 512, 4096) == 0


def test_the_benchmark_jobs_validate_for_every_model_and_method(tmp_path):
    for model in ("resnet18", "wide_resnet34_10", "efficientnet_b0"):
        for method in ("standard", "fgsm_rs", "fgsm_sdi", "pgd_at"):
            job = plain.bench_job(method, gpu=True, out=tmp_path, width=None, batch_size=8, epochs=1,
                                  train_size=16, model=model, image_size=memory.INPUT.get(model, 32))
            assert job["model"]["name"] == model and job["scaling"]["use_gpu"]


def test_reference_rows_are_matched_to_methods(tmp_path):
    rows = [{"method": "fgsm_rs", "bf16": False, "img_per_s": 10.0}, {"method": "fgsm_rs", "bf16": True,
            "img_per_s": 26000.0}, {"method": "fgsm_sdi_k20", "bf16": True, "img_per_s": 16000.0},
            {"method": "pgd10_at", "bf16": True, "compile": True, "img_per_s": 5600.0}]
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(rows))
    assert train_throughput.read_reference(str(path)) == {"fgsm_rs": 26000.0, "fgsm_sdi": 16000.0}


def test_profile_splits_an_fgsm_sdi_step_into_its_phases(tmp_path):
    out = tmp_path / "profile.json"
    assert profile_step.main(["--methods", "fgsm_sdi", "--steps", "20", "--warmup", "1", "--width", "4",
                              "--batch-size", "16", "--threads", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    share = row["phase_share"]
    assert set(share) == {"raydist.example", "raydist.generator", "raydist.update", "raydist.optimizer"}
    # k=20: the 20 profiled steps hold one generator update
    assert share["raydist.example"] > share["raydist.generator"] > 0
    assert abs(sum(v for k, v in share.items() if k != "raydist.generator") - 1) < 1e-6
    assert row["top_ops"] and row["ms_per_step"] > 0 and (tmp_path / "profile_fgsm_sdi.trace.json").is_file()
