"""`raydist eval` on a model trained elsewhere: a TRADES-layout WideResNet defined here and trained here with a
plain PyTorch loop, evaluated as a state dict of a registered architecture (--model --weights), through a function
of this module (--model-fn), and as torch.export / TorchScript files; the numbers equal a direct computation,
a normalised twin gives the same numbers, and every mismatch is one line and exit 2 before Ray starts."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydist.cli import main

EPS = 8 / 255
N, BATCH, SEED = 64, 32, 0
MEAN, STD = [0.3, 0.3, 0.3], [0.3, 0.3, 0.3]


# -- the user's model: TRADES' WideResNet layout (NetworkBlock.layer, convShortcut, an unused sub_block1) --------
class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(x)))
        else:
            out = self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x)))))
        return (x if self.equal else self.convShortcut(x)) + self.conv2(out)


class NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 10, widen_factor: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.sub_block1 = NetworkBlock(n, ch[0], ch[1], 1)  # built, never used (as in TRADES)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(ch[3]), nn.ReLU()
        self.fc = nn.Linear(ch[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(self.relu(self.bn1(out)), 1).flatten(1)
        return self.fc(out)


class Denormalize(nn.Module):
    """The twin's first layer: it takes normalised input z = (x - mean) / std and computes the original on x."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, z):
        return z * self.std + self.mean


def trades_wrn(weights: str, depth: int = 10, widen_factor: int = 1, normalised: bool = False) -> nn.Module:
    """What a user's --model-fn looks like: build the network, load its weights."""
    net = WideResNet(depth, widen_factor)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return nn.Sequential(Denormalize(MEAN, STD), net) if normalised else net


def not_a_model() -> int:
    return 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """WRN-10-1 trained for a few seconds on digits with a plain PyTorch loop; saved as a DDP state dict
    (module. prefixes), a torch.export archive and a TorchScript file."""
    from raydist.data import load_dataset

    torch.manual_seed(0)
    splits = load_dataset("digits")
    x_all, y_all = splits.train_x.float() / 255, splits.train_y
    model = WideResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(4):
        perm = torch.randperm(len(y_all))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            opt.step()
    model.eval()
    d = tmp_path_factory.mktemp("byo")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, d / "wrn.pt")
    example = (splits.test_x[:4].float() / 255,)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(model, example, dynamic_shapes=({0: batch},)), d / "wrn.pt2")
    torch.jit.save(torch.jit.trace(model, example), d / "wrn_script.pt")
    return model, splits, d


def direct(model, splits, attack: str | None):
    """Accuracy computed here, batch by batch with the evaluation's seeds (seed + first index of the batch)."""
    from raydist.attacks import run_attack

    model.eval()
    correct = 0
    for b0 in range(0, N, BATCH):
        x = splits.test_x[b0:b0 + BATCH].float() / 255
        y = splits.test_y[b0:b0 + BATCH]
        if attack is not None:
            x = run_attack(attack, model, x, y, EPS, seed=SEED + b0)
        with torch.no_grad():
            correct += int((model(x).argmax(1) == y).sum())
    return correct / N


def _eval(tmp_path, name, *how):
    out = tmp_path / name
    code = main(["eval", *how, "--dataset", "digits", "--eps", "8/255", "--attacks", "clean,pgd5", "--samples",
                 str(N), "--shard-size", str(BATCH), "--batch-size", str(BATCH), "--workers", "1", "--seed",
                 str(SEED), "--out", str(out)])
    assert code == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.usefixtures("ray_session")
def test_three_ways_give_the_direct_numbers(trained, tmp_path):
    model, splits, d = trained
    clean, pgd = direct(model, splits, None), direct(model, splits, "pgd5")
    assert clean > 0.5 and pgd < clean  # trained, and the attack has something to break

    weights = _eval(tmp_path, "w", "--model", "wide_resnet34_10", "--model-args", "depth=10", "--model-args",
                    "width=1", "--weights", str(d / "wrn.pt"))
    fn = _eval(tmp_path, "f", "--model-fn", "test_eval_byo:trades_wrn", "--model-args", f"weights={d / 'wrn.pt'}")
    pt2 = _eval(tmp_path, "e", str(d / "wrn.pt2"))
    script = _eval(tmp_path, "s", str(d / "wrn_script.pt"))
    for rep in (weights, fn):
        acc = rep["rows"][0]["accuracy"]
        assert (acc["clean"], acc["pgd5"]) == (clean, pgd), rep["rows"][0]
    for rep in (pt2, script):  # other kernels for the same operations: the same up to a borderline sample
        acc = rep["rows"][0]["accuracy"]
        assert acc["clean"] == clean and abs(acc["pgd5"] - pgd) <= 1 / N, (acc, pgd)

    row = weights["rows"][0]
    assert row["source"]["kind"] == "weights" and row["source"]["architecture"] == "wide_resnet34_10"
    import hashlib

    assert row["sha256"] == hashlib.sha256((d / "wrn.pt").read_bytes()).hexdigest()
    assert fn["rows"][0]["source"]["function"] == "test_eval_byo:trades_wrn"
    assert pt2["rows"][0]["source"]["format"] == "pt2" and script["rows"][0]["source"]["format"] == "torchscript"
    assert weights["data"] == {"dataset": "digits", "samples": N} and weights["epsilon"] == EPS
    assert weights["budgets"]["pgd5"]["steps"] == 5 and weights["budgets"]["pgd5"]["restarts"] == 1
    # worst case over clean and pgd5 is pgd5's robust points that were also right to begin with
    assert row["worst_case"] <= min(row["accuracy"]["pgd5"], row["accuracy"]["clean"])


@pytest.mark.usefixtures("ray_session")
def test_a_normalised_twin_gives_the_same_numbers(trained, tmp_path):
    _, _, d = trained
    plain = _eval(tmp_path, "p", "--model-fn", "test_eval_byo:trades_wrn", "--model-args", f"weights={d / 'wrn.pt'}")
    twin = _eval(tmp_path, "t", "--model-fn", "test_eval_byo:trades_wrn", "--model-args", f"weights={d / 'wrn.pt'}",
                 "--model-args", "normalised=true", "--mean", ",".join(map(str, MEAN)), "--std",
                 ",".join(map(str, STD)))
    a, b = plain["rows"][0]["accuracy"], twin["rows"][0]["accuracy"]
    assert a["clean"] == b["clean"] and abs(a["pgd5"] - b["pgd5"]) <= 1 / N, (a, b)
    assert twin["rows"][0]["source"]["mean"] == MEAN


@pytest.mark.parametrize("how, named", [
    (["--model", "wide_resnet34_10", "--model-args", "depth=16", "--model-args", "width=1"], "missing"),
    (["--model", "preact_resnet18", "--model-args", "width=8"], "do not fit model 'preact_resnet18'"),
    (["--model", "wide_resnet34_10", "--model-args", "depth=10", "--model-args", "width=1", "--num-classes", "7"],
     "--num-classes 7"),
    (["--model-fn", "test_eval_byo:not_a_model"], "returned a int"),
    (["--model-fn", "test_eval_byo:nothing_here"], "no function 'nothing_here'"),
    (["--model-fn", "no_such_module_xyz:f"], "no_such_module_xyz"),
    (["--model-fn", "test_eval_byo:trades_wrn", "--model-args", "weights=WEIGHTS", "--mean", "0.5"],
     "--mean and --std go together"),
    (["--model", "no_such_net"], "--model"),
])
def test_mismatches_are_one_line_and_exit_2_before_ray(trained, tmp_path, capsys, how, named):
    _, _, d = trained
    how = [a.replace("WEIGHTS", str(d / "wrn.pt")) for a in how]
    if "--model" in how and "--weights" not in how:
        how += ["--weights", str(d / "wrn.pt")]
    out = tmp_path / "o"
    assert main(["eval", *how, "--dataset", "digits", "--eps", "8/255", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_weights_that_would_run_code_are_refused(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("RAN",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    assert main(["eval", "--model", "resnet18", "--weights", str(path), "--dataset", "digits", "--eps", "8/255",
                 "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "RAN" not in captured.out and "refused" in captured.err and "evil.pt" in captured.err


def test_reference_layouts_are_mapped(tmp_path):
    """FGSM-SDI's / Fast-AT's ResNet-18 (classifier `linear`) and PreAct ResNet-18 (`shortcut.0`), saved under DDP
    (`module.`) or a `model.` wrapper, load into raydist's models and compute the same (TRADES' WRN: above)."""
    from raydist.models.checkpoint import reference_state_dict
    from raydist.models.pretrained import fit_state_dict
    from raydist.models.registry import create_model

    for name, rename, prefix in (("resnet18", lambda k: k.replace("fc.", "linear."), "module."),
                                 ("preact_resnet18", lambda k: k.replace("shortcut.", "shortcut.0."), "model.")):
        src = create_model(name, width=4, mean=[0.0] * 3, std=[1.0] * 3)
        path = tmp_path / f"{name}.pt"
        torch.save({f"{prefix}{rename(k)}": v for k, v in src.net.state_dict().items()}, path)
        dst = create_model(name, width=4, mean=[0.0] * 3, std=[1.0] * 3)
        fit_state_dict(dst, reference_state_dict(path, name), "test")
        x = torch.rand(2, 3, 32, 32)
        assert torch.equal(src.eval()(x), dst.eval()(x)), name


@pytest.mark.usefixtures("ray_session")
def test_worst_case_restarts_and_robustbench_json(trained, tmp_path):
    _, _, d = trained
    out = tmp_path / "rb"
    rb = tmp_path / "robustbench.json"
    assert main(["eval", "--model-fn", "test_eval_byo:trades_wrn", "--model-args", f"weights={d / 'wrn.pt'}",
                 "--dataset", "digits", "--eps", "8/255", "--attacks", "clean,fgsm,pgd3,fab-t", "--restarts", "2",
                 "--samples", "32", "--shard-size", "32", "--batch-size", "32", "--workers", "1", "--out", str(out),
                 "--robustbench-json", str(rb)]) == 0
    import pyarrow.parquet as pq

    rep = json.loads((out / "report.json").read_text())
    assert rep["attacks"] == ["clean", "fgsm", "pgd3x2", "fab-t"] and rep["budgets"]["pgd3x2"]["restarts"] == 2
    row = rep["rows"][0]
    df = pq.read_table(out / "samples.parquet").to_pandas()
    ok = {a: g.sort_values("index").robust.to_numpy() for a, g in df.groupby("attack")}
    right = df[df.attack == "clean"].sort_values("index")
    right = (right.clean_pred == right.label).to_numpy()
    worst = (ok["fgsm"] & ok["pgd3x2"] & ok["fab-t"] & right).mean()
    assert row["worst_case"] == pytest.approx(worst)
    assert row["worst_case"] <= min(row["accuracy"][a] for a in ("fgsm", "pgd3x2", "fab-t"))
    fab = row["min_norm"]["fab-t"]
    flipped = df[(df.attack == "fab-t") & (df.clean_pred == df.label) & ~df.robust]
    assert fab["successful"] == len(flipped)
    if len(flipped):
        assert 0 < fab["median_linf"] <= EPS + 1e-6 and fab["mean_linf"] == pytest.approx(flipped.linf.mean())
    text = (out / "report.md").read_text()
    assert "Worst case" in text and "PGD-3x2" in text and "test_eval_byo:trades_wrn" in text
    bench = json.loads(rb.read_text())
    assert bench["eps"] == "8/255" and bench["dataset"] == "digits" and bench["threat_model"] == "Linf"
    assert float(bench["clean_acc"]) == pytest.approx(100 * row["clean"], abs=0.01)
    assert float(bench["autoattack_acc"]) == pytest.approx(100 * row["worst_case"], abs=0.01)
    assert not math.isnan(float(bench["clean_acc"]))
