"""Job files: defaults, fraction parsing, overrides, and one-line errors with exit code 2 before Ray starts."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import ROOT, tiny_job, write_job

from raydist import config as C
from raydist.cli import main


def test_fraction_parsing():
    assert C.parse_fraction("8/255", "k") == pytest.approx(8 / 255)
    assert C.parse_fraction(0.5, "k") == 0.5
    assert C.parse_fraction("0.25", "k") == 0.25
    for bad in ("8/0", "abc", True, None):
        with pytest.raises(C.ConfigError, match="method.epsilon"):
            C.parse_fraction(bad, "method.epsilon")


def test_defaults_and_overrides(tmp_path):
    path = write_job(tmp_path, tiny_job(tmp_path))
    cfg = C.load_job(path, ["method.k=10", "optim.lr=0.05", "method.epsilon=4/255", "data.flip=true"])
    assert cfg["method"]["k"] == 10
    assert cfg["optim"]["lr"] == 0.05
    assert cfg["method"]["epsilon"] == pytest.approx(4 / 255)
    assert cfg["data"]["flip"] is True
    assert cfg["optim"]["momentum"] == 0.9  # default filled in
    assert cfg["run"]["name"] == "t"


def test_run_name_defaults_to_job_file_stem(tmp_path):
    job = tiny_job(tmp_path)
    del job["run"]["name"]
    cfg = C.load_job(write_job(tmp_path, job, "my_job.yaml"))
    assert cfg["run"]["name"] == "my_job"


def test_every_shipped_job_file_validates(monkeypatch):
    jobs = sorted((ROOT / "jobs").glob("*.yaml"))
    assert jobs, "no job files in jobs/"
    check_data = C._check_data
    for path in jobs:
        raw = yaml.safe_load(path.read_text())
        if "base" in raw or "space" in raw or "methods" in raw:  # sweep and compare files have their own tests
            continue
        data = raw.get("data", {})
        if data.get("dataset") in ("cifar10", "cifar100"):
            raw["data"]["download"] = True  # the files are not on this machine; the schema is what we check
        # ImageNet is not on this machine either: check everything but the files' presence
        image = data.get("dataset") in ("imagenet", "tiny_imagenet")
        monkeypatch.setattr(C, "_check_data", (lambda d: None) if image else check_data)
        C.validate(raw, name_hint=path.stem)


BAD = [
    (["--set", "method.kk=3"], "method.kk", "did you mean 'k'"),
    (["--set", "optim.lr=fast"], "optim.lr", "expected a number"),
    (["--set", "method.epsilon=-0.1"], "method.epsilon", ">= 0"),
    (["--set", "method.k=0"], "method.k", ">= 1"),
    (["--set", "model.name=resnet19"], "model.name", "did you mean 'resnet18'"),
    (["--set", "method.name=fgsm_sd"], "method.name", "did you mean 'fgsm_sdi'"),
    (["--set", "model.activation=relu6x"], "model.activation", "unknown value"),
    (["--set", "data.dataset=cifar11"], "data.dataset", "unknown value"),
    (["--set", "data.dataset=cifar10", "--set", "data.root=/nonexistent/cifar"], "/nonexistent/cifar", ""),
    (["--set", "method.name=pgd_at"], "method.k", "not a parameter of method 'pgd_at'"),
    (["--set", "scaling.num_workers=-1"], "scaling.num_workers", ">= 0"),
    (["--set", "optim.epochs=2.5"], "optim.epochs", "expected an integer"),
    (["--set", "run.seed=true"], "run.seed", "expected an integer"),
    (["--set", "optim.schedule=linear"], "optim.schedule", "choose from"),
    (["--set", "nosection.x=1"], "nosection", "unknown section"),
    (["--set", "method.k"], "method.k", "SECTION.KEY=VALUE"),
    (["--set", "run.output_dir=s3://bucket/runs"], "run.output_dir", "run.storage_path: s3://bucket/runs"),
    (["--set", "run.storage_path=ftp://host/ckpt"], "run.storage_path", "unknown URI scheme 'ftp://'"),
    (["--set", "scaling.use_gpu=true", "--set", "scaling.num_workers=2", "--set", "scaling.gpus_per_worker=0.5"],
     "scaling.gpus_per_worker", "Duplicate GPU detected"),
    (["--set", "scaling.use_gpu=true", "--set", "scaling.gpus_per_worker=2"], "scaling.gpus_per_worker",
     "reserves GPUs a worker never uses"),
    (["--set", "run.channels_last=true"], "run.channels_last", "needs CUDA workers"),
]


@pytest.mark.parametrize("extra,needle,detail", BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, needle, detail):
    path = write_job(tmp_path, tiny_job(tmp_path))
    code = main(["train", str(path), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert needle in err and detail in err
    assert not (tmp_path / "runs").exists()  # nothing was created, no compute started


def test_unknown_key_in_file(tmp_path, capsys):
    job = tiny_job(tmp_path)
    job["optim"]["learning_rate"] = 0.1
    assert main(["train", str(write_job(tmp_path, job))]) == 2
    err = capsys.readouterr().err
    assert "optim.learning_rate" in err


def test_missing_job_file_and_bad_yaml(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "job file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: [x\n")
    assert main(["check", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    path = write_job(tmp_path, tiny_job(tmp_path))
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "best.pt").write_bytes(b"precious")
    assert main(["train", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "best.pt").read_bytes() == b"precious"


def test_storage_path_holding_a_run_is_not_reused_without_a_flag(tmp_path, capsys):
    """Ray Train restores whatever run it finds at storage_path/name, so a fresh run refuses to start on one."""
    storage = tmp_path / "ckpt"
    path = write_job(tmp_path, tiny_job(tmp_path, run={"storage_path": storage.as_uri()}))
    cfg = C.load_job(path)
    assert cfg["run"]["storage_path"] == storage.as_uri()
    assert C.load_job(path, [f"run.storage_path={tmp_path}/x/../ckpt"])["run"]["storage_path"] == str(storage)
    (storage / "t" / "epoch_0001").mkdir(parents=True)
    (storage / "t" / "epoch_0001" / "last.pt").write_bytes(b"precious")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.storage_path" in err and f"{storage.as_uri()}/t" in err
    assert (storage / "t" / "epoch_0001" / "last.pt").read_bytes() == b"precious"
    assert not (tmp_path / "runs").exists()

    from raydist.cluster import storage as S

    S.delete_experiment(storage.as_uri(), "t")  # what --overwrite does before a fresh start
    assert not (storage / "t").exists() and storage.exists()


def test_resume_without_checkpoint(tmp_path, capsys):
    path = write_job(tmp_path, tiny_job(tmp_path))
    assert main(["train", str(path), "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err


def test_resume_with_corrupt_checkpoint(tmp_path, capsys):
    path = write_job(tmp_path, tiny_job(tmp_path))
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"not a checkpoint")
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "cannot read checkpoint" in err


def test_check_prints_resolved_config(tmp_path, capsys):
    path = write_job(tmp_path, tiny_job(tmp_path))
    assert main(["check", str(path), "--set", "method.k=7"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["method"]["k"] == 7 and cfg["model"]["width"] == 8


def test_schedules():
    from raydist.train.schedules import lr_multiplier

    ms = lr_multiplier("multistep", epochs=110, steps_per_epoch=10)
    assert ms(999) == 1.0 and ms(1000) == pytest.approx(0.1) and ms(1050) == pytest.approx(0.01)
    cyc = lr_multiplier("cyclic", epochs=10, steps_per_epoch=10, peak=0.4)
    assert cyc(0) == 0.0 and cyc(40) == pytest.approx(1.0) and cyc(100) == pytest.approx(0.0)
    assert cyc(20) == pytest.approx(0.5) and cyc(70) == pytest.approx(0.5)
    cos = lr_multiplier("cosine", epochs=10, steps_per_epoch=10)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)


def test_method_keys_in_the_schema_match_the_methods():
    """Every method parameter is a typed job key; a resolved job carries the method's own defaults."""
    from raydist.methods import METHOD_PARAMS

    for name, params in METHOD_PARAMS.items():
        raw = {"method": {"name": name}}
        cfg = C.validate(raw)
        for key, default in params.items():
            assert key in C.SCHEMA["method"], (name, key)
            assert cfg["method"][key] == default, (name, key)
    assert C.validate({"method": {"name": "fgsm_ga"}})["method"]["random_start"] is False
    assert C.validate({"method": {"name": "pgd_at"}})["method"]["random_start"] is True


def test_readme_is_a_front_door_and_the_docs_cover_every_job_key_and_command():
    text = (ROOT / "README.md").read_text()
    assert text.index("make demo") < 400 and text.index("make test") < 600  # the two commands open the README
    assert len(text.splitlines()) < 300  # what a newcomer needs; the references live in docs/
    for command in ("raydist train", "raydist check", "raydist models", "raydist tune", "raydist eval",
                    "raydist compare", "raydist submit", "raydist data to-parquet", "--resume", "--overwrite",
                    "--set"):
        assert command in text
    for link in re.findall(r"\]\((docs/[^)#]+)\)", text):
        assert (ROOT / link).is_file(), f"README links {link}, which does not exist"
    jobs, keys = (ROOT / "docs" / "jobs.md").read_text(), (ROOT / "docs" / "keys.md").read_text()
    for section, fields in C.SCHEMA.items():
        for key in fields:
            assert f"`{section}.{key}`" in keys, f"{section}.{key} is not in docs/keys.md"
    assert "(keys.md)" in jobs
    for job in sorted((ROOT / "jobs").glob("*.yaml")):
        assert f"jobs/{job.name}" in jobs, f"jobs/{job.name} is not in docs/jobs.md"
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        words = page.read_text().lower()
        for phrase in ("this session", "helpers?", "lent", "subagents?"):
            assert not re.search(rf"\b{phrase}\b", words), f"{page.name} speaks of how the project was built: {phrase}"


def test_resolved_config_is_itself_a_valid_job(tmp_path):
    cfg = C.load_job(write_job(tmp_path, tiny_job(tmp_path)))
    assert "steps" not in cfg["method"]  # pgd_at's key, not FGSM-SDI's
    again = tmp_path / "again.yaml"
    again.write_text(C.dump(cfg))
    assert C.load_job(again) == cfg


def test_a_failure_after_validation_is_one_line_and_exit_1(capsys):
    from raydist.cli import _failure_exits_1

    def fails():
        try:
            raise FloatingPointError("training loss is nan at epoch 3\nmore")
        except FloatingPointError as inner:
            raise RuntimeError("worker group failed") from inner

    assert _failure_exits_1("training", fails, root_cause=True) == 1
    assert capsys.readouterr().err == "raydist: training failed: FloatingPointError: training loss is nan at epoch 3\n"
    assert _failure_exits_1("sweep", fails) == 1
    assert capsys.readouterr().err == "raydist: sweep failed: RuntimeError: worker group failed\n"
    assert _failure_exits_1("sweep", lambda: None) == 0
    with pytest.raises(C.ConfigError):
        _failure_exits_1("sweep", lambda: (_ for _ in ()).throw(C.ConfigError("x")))


def test_a_gpu_fraction_is_fine_for_a_single_rank():
    cfg = C.validate({"scaling": {"use_gpu": True, "num_workers": 1, "gpus_per_worker": 0.25}})
    assert cfg["scaling"]["gpus_per_worker"] == 0.25
    assert C.validate({"scaling": {"num_workers": 4, "gpus_per_worker": 0.5}})  # no GPUs asked for: not read


def test_fidelity_page_covers_every_method_and_attack():
    """docs/fidelity.md (linked from the README) has a section per training method and a row per attack, so a new
    method or attack cannot ship without its reference comparison."""
    from raydist.attacks import ATTACKS
    from raydist.compare.spec import LABELS
    from raydist.methods import METHODS

    page = (ROOT / "docs" / "fidelity.md").read_text()
    assert "(docs/fidelity.md)" in (ROOT / "README.md").read_text()
    for name in METHODS:
        if name != "standard":
            assert f"### {LABELS[name]} (" in page, name
    assert "### SAT (" in page
    attacks = page.split("## Attacks", 1)[1].split("\n## ", 1)[0]
    for name in ATTACKS:
        if name != "clean":
            assert f"`{name}`" in attacks, name


def test_paper_protocol_files_say_their_precision_and_sdi_cyclic_peak():
    """The references train in fp32 (apex fp16 for FGSM-RS and GradAlign, bfloat16 for EfficientNet on TPU) while
    run.precision auto means bf16 on CUDA: every file meant to reproduce a paper states its precision. FGSM-SDI's
    30-epoch protocol uses torch's CyclicLR, which peaks half way."""
    for path in [*sorted((ROOT / "jobs").glob("cifar10_*.yaml")), *sorted((ROOT / "jobs").glob("imagenet_sat_*.yaml"))]:
        assert yaml.safe_load(path.read_text())["run"]["precision"] in ("fp32", "bf16"), path.name
    for name in ("compare_cifar10.yaml", "compare_digits.yaml"):
        assert yaml.safe_load((ROOT / "jobs" / name).read_text())["overrides"]["run.precision"] == "fp32", name
    tune = yaml.safe_load((ROOT / "jobs" / "tune_cifar10_fgsm_sdi.yaml").read_text())
    assert tune["set"]["optim.schedule"] == "cyclic" and tune["set"]["optim.peak"] == 0.5


def test_fgsm_sdi_job_label_smoothing_is_the_reference_factor():
    """The released FGSM_SDI.py (--factor 0.9) trains on targets 0.9 for the true class and 0.1/9 for each other
    class; torch's label_smoothing s gives 1 - s + s/10 and s/10, so the job's 0.111 is that factor."""
    import torch
    import torch.nn.functional as F

    s = yaml.safe_load((ROOT / "jobs" / "cifar10_fgsm_sdi.yaml").read_text())["method"]["label_smoothing"]
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 10
    factor = 0.9
    target = torch.full((64, 10), (1 - factor) / 9).scatter_(1, y[:, None], factor)
    reference = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert F.cross_entropy(logits, y, label_smoothing=s).item() == pytest.approx(reference.item(), rel=1e-4)
