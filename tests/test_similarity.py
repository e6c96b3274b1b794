"""Task similarity (He et al.): the matrix, its caching, and the embedded benchmark's ranking."""

import pytest
import torch

from mcit.similarity import MODALITIES, similarity_matrix


def _emb(*vectors):
    return [{m: torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=0) for m in MODALITIES}
            for v in vectors]


def test_similarity_is_the_product_of_sigmoid_zscored_cosines():
    e = _emb([1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0])
    s = similarity_matrix(e)
    assert torch.equal(s, s.T) and torch.all(torch.diagonal(s) == 1.0)
    assert ((s > 0) & (s <= 1)).all()
    cos = torch.stack([x["image"] for x in e]).double()
    cos = cos @ cos.T
    pairs = torch.tensor([cos[0, 1], cos[0, 2], cos[1, 2]])
    z01 = (cos[0, 1] - pairs.mean()) / pairs.std(unbiased=False)
    assert s[0, 1].item() == pytest.approx(torch.sigmoid(z01).item() ** 3, rel=1e-6)  # same in all three modalities
    assert s[0, 1] > s[0, 2] and s[0, 1] > s[1, 2]
    # the modalities multiply: a pair dissimilar in one modality is dissimilar overall
    mixed = _emb([1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0])
    mixed[1]["answer"] = torch.tensor([0.0, 0.0, 1.0])
    assert similarity_matrix(mixed)[0, 1] < s[0, 1]
    assert similarity_matrix(e[:1]).tolist() == [[1.0]]


def test_embedded_benchmark_ranks_related_tasks_above_unrelated(smoke_cfg, smoke_run, monkeypatch):
    from mcit import similarity
    from mcit.similarity import stream_similarity

    cfg = smoke_cfg("benchmark.tasks=[caption,color,count,spatial]")
    tasks, s = stream_similarity(cfg, samples=64, show_progress=False)
    i = {t: k for k, t in enumerate(tasks)}
    vqa_pair = s[i["color"], i["spatial"]]  # two question-answering tasks about the same shapes
    assert vqa_pair > s[i["caption"], i["count"]]  # a caption task against counting
    off = s[~torch.eye(len(tasks), dtype=torch.bool)]
    assert vqa_pair == off.max()
    # embeddings are cached per task: a second computation needs no sentence encoder
    monkeypatch.setattr(similarity, "TextEncoder", lambda *a, **k: pytest.fail("recomputed instead of cached"))
    _, again = stream_similarity(cfg, samples=64, show_progress=False)
    assert torch.equal(again, s)


def test_similarity_cli(smoke_cfg, smoke_run, tmp_path, monkeypatch, capsys):
    import sys

    from mcit.cli import main
    from tests.conftest import SMOKE

    fig = tmp_path / "sim.png"
    monkeypatch.setattr(sys, "argv", ["mcit", "similarity", str(SMOKE), "--set", f"cache_dir={smoke_cfg().cache_dir}",
                                      "--samples", "32", "--figure", str(fig)])
    main()
    out = capsys.readouterr().out
    assert "task similarity" in out and "color" in out and fig.read_bytes()[:4] == b"\x89PNG"


def test_text_encoder_batches_by_length_and_counts_repeats():
    from mcit.similarity import TextEncoder

    text = TextEncoder()
    texts = ["a red circle", "what colour is the square at the top left of the picture?", "a red circle", "two",
             "the word owl in blue", "two", "two"]
    one_by_one = torch.cat([text.encode([t]) for t in texts])
    batched = text.encode(texts, batch_size=3)  # length-sorted batches, returned in the input order
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    assert torch.allclose(text.mean(texts), one_by_one.mean(0), atol=1e-5)  # distinct texts weighted by count
    assert text.encode([]).shape == (0, one_by_one.shape[1])
