"""Prompt pool and Fwd-Prompt: insertion, selection, projection, bases, resume."""

import json

import pytest
import torch

from mcit.methods.prompt import POOL_ATTR, extend_basis, project
from mcit.runner import run
from tests.conftest import kill_and_resume
from tests.test_methods import _method, _tiny_ctx


def _random_basis(d=16, ranks=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = None
    for r in ranks:
        rows = torch.randn(50, r, generator=g) @ torch.randn(r, d, generator=g)
        basis = extend_basis(basis, rows, 0.999)
    return basis


def test_projected_gradient_is_orthogonal_to_the_old_basis():
    old = _random_basis()
    pre = _random_basis(ranks=(4,), seed=1)
    grad = torch.randn(3, 5, 16, dtype=torch.float64)
    for residual_pretrained in (1.0, 0.0, 2.5):
        out = project(grad, old, pre, True, residual_pretrained)
        assert out.shape == grad.shape
        assert (out.reshape(-1, 16) @ old).abs().max() < 1e-5
    # the pre-trained component is reinforced: more of the result lies in U_pre than without it
    plain = project(grad, old, pre, True, 0.0).reshape(-1, 16)
    boosted = project(grad, old, pre, True, 1.0).reshape(-1, 16)
    assert (boosted @ pre).norm() > 1.5 * (plain @ pre).norm()
    # residual off, pre-trained only: g + beta * g U U^T
    only_pre = project(grad, old, pre, False, 1.0).reshape(-1, 16)
    g = grad.reshape(-1, 16)
    torch.testing.assert_close(only_pre, g + (g @ pre) @ pre.T)


def test_projection_with_empty_bases_is_the_identity():
    grad = torch.randn(2, 3, 8)
    assert torch.equal(project(grad, None, None, True, 1.0), grad)
    empty = torch.zeros(8, 0, dtype=torch.float64)
    torch.testing.assert_close(project(grad, empty, empty, True, 1.0), grad)


def test_bases_stay_orthonormal_and_capture_each_task():
    g = torch.Generator().manual_seed(3)
    basis, ranks = None, []
    for _ in range(5):
        rows = torch.randn(80, 3, generator=g) @ torch.randn(3, 24, generator=g) + 0.01 * torch.randn(80, 24, generator=g)
        basis = extend_basis(basis, rows, 0.95)
        ranks.append(basis.shape[1])
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
        inside = ((rows.double() @ basis) ** 2).sum() / (rows.double() ** 2).sum()
        assert inside >= 0.95
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1] <= 24
    # a task inside the span adds nothing
    assert extend_basis(basis, basis.T[:2].float() * 5, 0.95).shape[1] == basis.shape[1]


def test_balanced_basis_captures_the_text_rows_that_large_image_rows_hide():
    from mcit.methods.prompt import FwdPrompt, FwdPromptOptions

    g = torch.Generator().manual_seed(5)
    image_rows = 50 * torch.randn(300, 2, generator=g) @ torch.randn(2, 32, generator=g)  # big, 2 directions
    text_rows = torch.randn(100, 6, generator=g) @ torch.randn(6, 32, generator=g)  # small, 6 directions
    rows, image = torch.cat([image_rows, text_rows]), torch.arange(400) < 300

    def captured(basis, part):
        return float(((part.double() @ basis) ** 2).sum() / (part.double() ** 2).sum())

    plain = FwdPrompt(FwdPromptOptions(balance=False))._extend(None, rows, image, 0.95)
    balanced = FwdPrompt(FwdPromptOptions(balance=True))._extend(None, rows, image, 0.95)
    assert plain.shape[1] <= 2 and captured(plain, text_rows) < 0.5  # the image rows fill the budget
    assert captured(balanced, text_rows) >= 0.95 and captured(balanced, image_rows) >= 0.95
    torch.testing.assert_close(balanced.T @ balanced, torch.eye(balanced.shape[1], dtype=torch.float64))


def _prompted(tmp_path, name="prompt_pool", seed=7, **options):
    model, processor, enc, samples, ctx = _tiny_ctx(tmp_path, text_layers=max(1, options.get("depth", 1)))
    ctx.seed = seed
    m = _method(name, **{"pool_size": 4, "length": 2, "top_k": 2, **options})
    m.setup(model, ctx)
    return m, model, enc, samples, ctx


def test_only_the_pool_trains_and_its_prompts_fill_the_placeholders(tmp_path):
    m, model, enc, samples, ctx = _prompted(tmp_path)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{POOL_ATTR}.prompts", f"{POOL_ATTR}.text_keys", f"{POOL_ATTR}.image_keys"}
    batch = enc.train_batch(samples)
    assert (batch["input_ids"][:, 1:5] == enc.tokenizer.pad_token_id).all() and batch["attention_mask"][:, 1:5].all()
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda mod, a, kw: seen.update(emb=kw["inputs_embeds"]), with_kwargs=True)
    out = model(**batch)
    handle.remove()
    chosen = m.last_selection
    expected = m.pool.prompts[chosen].reshape(2, 4, -1)
    torch.testing.assert_close(seen["emb"][:, 1:5], expected)
    loss = out.loss + m.extra_loss(batch, out, ctx)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {f"{POOL_ATTR}.prompts", f"{POOL_ATTR}.text_keys", f"{POOL_ATTR}.image_keys"}
    unselected = [i for i in range(4) if i not in chosen.flatten().tolist()]
    assert all(m.pool.prompts.grad[i].abs().sum() == 0 for i in unselected)


def test_deep_prompts_fill_each_layers_placeholders(tmp_path):
    from mcit.errors import ConfigError

    m, model, enc, samples, ctx = _prompted(tmp_path, depth=2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{POOL_ATTR}.prompts", f"{POOL_ATTR}.layer_prompts", f"{POOL_ATTR}.text_keys", f"{POOL_ATTR}.image_keys"}
    batch = enc.train_batch(samples)
    seen = {}
    layer1 = model.model.language_model.layers[1]
    handle = layer1.register_forward_pre_hook(lambda mod, a, kw: seen.update(h=a[0] if a else kw["hidden_states"]),
                                              with_kwargs=True)
    out = model(**batch)
    handle.remove()
    chosen = m.last_selection
    torch.testing.assert_close(seen["h"][:, 1:5], m.pool.layer_prompts[chosen, 0].reshape(2, 4, -1))
    assert not torch.allclose(seen["h"][:, 1:5], m.pool.prompts[chosen].reshape(2, 4, -1))
    out.loss.backward()
    grad = m.pool.layer_prompts.grad
    unselected = [i for i in range(4) if i not in chosen.flatten().tolist()]
    assert all(grad[i].abs().sum() == 0 for i in unselected)
    assert all(grad[i].abs().sum() > 0 for i in chosen.flatten().tolist())
    # depth 1 on the same model keeps the pool of earlier versions: same prompts and keys, no layer prompts
    model, _, _, _, ctx = _tiny_ctx(tmp_path, text_layers=2)
    shallow = _method("prompt_pool", pool_size=4, length=2, top_k=2)
    shallow.setup(model, ctx)
    assert shallow.pool.layer_prompts is None and torch.equal(shallow.pool.prompts, m.pool.prompts)
    model, _, _, _, ctx = _tiny_ctx(tmp_path, text_layers=2)
    with pytest.raises(ConfigError, match="method.depth: 3 exceeds the language model's 2 layers"):
        _method("prompt_pool", depth=3).setup(model, ctx)


def test_each_forward_pass_starts_clean_and_its_key_loss_is_taken_once(tmp_path):
    from mcit.errors import McitError

    m, model, enc, samples, ctx = _prompted(tmp_path, depth=2, key_weight=0.5)
    batch = enc.train_batch(samples)
    out = model(**batch)
    first = m.extra_loss(batch, out, ctx)
    assert first is not None and first.requires_grad and float(first.detach()) > 0
    assert m.extra_loss(batch, out, ctx) is None  # taken once: a second step does not add it again
    with torch.no_grad():  # an evaluation pass makes no key loss
        model(**batch)
    assert m.extra_loss(batch, out, ctx) is None
    # a prefill without pixels and without route(): refused, and the last pass's selection is gone,
    # so the deep layers' hooks place nothing
    seen = {}
    layer1 = model.model.language_model.layers[1]
    handle = layer1.register_forward_pre_hook(lambda mod, a, kw: seen.update(h=a[0] if a else kw["hidden_states"]),
                                              with_kwargs=True)
    with pytest.raises(McitError, match="without route"):
        model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    embeds = model.get_input_embeddings()(batch["input_ids"])  # the embedding hook places nothing either
    pad = model.get_input_embeddings().weight[enc.tokenizer.pad_token_id]
    assert torch.equal(embeds[:, 1:5], pad.expand(2, 4, -1))
    model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    assert not any(torch.allclose(seen["h"][i, 1:5], m.pool.layer_prompts[m.last_selection[i], 0].reshape(4, -1))
                   for i in range(2))
    handle.remove()


def test_fwd_prompt_projects_each_layers_prompts_off_its_own_old_basis(tmp_path):
    m, model, enc, samples, ctx = _prompted(tmp_path, name="fwd_prompt", depth=2, pretrained=0.0)
    ctx.train_data = {"a": samples}
    rows, image = m.embeddings(samples, ctx)
    assert len(rows) == 2 and all(len(r) == len(image) for r in rows)
    assert int(image.sum()) == len(samples) * enc.n_image_tokens  # the image rows are flagged as such
    m.after_task("a", ctx)
    old0, old1 = m.old_bases
    assert old0.shape[1] >= 1 and old1.shape[1] >= 1
    assert not torch.allclose(old0.T @ old1, torch.eye(old0.shape[1], old1.shape[1], dtype=old0.dtype))  # two subspaces
    model(**enc.train_batch(samples)).loss.backward()
    m.before_step(ctx)
    g0 = m.pool.prompts.grad.reshape(-1, old0.shape[0]).double()
    g1 = m.pool.layer_prompts.grad.reshape(-1, old1.shape[0]).double()
    assert g1.abs().max() > 0 and (g0 @ old0).abs().max() < 1e-5 and (g1 @ old1).abs().max() < 1e-5


def test_exact_key_fit_keys_a_tasks_entries_to_its_queries_once(tmp_path):
    from types import SimpleNamespace

    from mcit.methods.query import pull_keys

    m, model, enc, samples, ctx = _prompted(tmp_path, pool_size=6, key_fit="exact", keys=2, diversity=False)
    ctx.config, ctx.train_data = SimpleNamespace(seed=7), {"a": samples, "b": samples}
    assert m.pool.text_keys.shape == (6, 2, 32)
    before = m.pool.text_keys.detach().clone()
    batch = enc.train_batch(samples)
    m.before_task("a", samples, ctx)
    out = model(**batch)  # a training forward: counts selections; the key loss trains keys meanwhile
    m.extra_loss(batch, out, ctx).backward()
    assert m.pool.text_keys.grad[m.last_selection[0]].abs().sum() > 0
    m.after_task("a", ctx)
    mine = m.entries_of["a"]
    assert mine == sorted(set(m.last_selection.flatten().tolist())) and m.keyed == mine
    gen = enc.generation_batch(samples)
    q_image, q_text = m.queries(gen["input_ids"], gen["attention_mask"], {"pixel_values": gen["pixel_values"]})
    for e in mine:
        torch.testing.assert_close(m.pool.text_keys[e], pull_keys(q_text, 2, 100))
        torch.testing.assert_close(m.pool.image_keys[e], pull_keys(q_image, 2, 100))
    others = [e for e in range(6) if e not in mine]
    assert torch.equal(m.pool.text_keys[others], before[others])
    # its test samples now select its entries, and the routing report says so
    ctx.stage = 1
    assert m.route(enc.generation_batch(samples), ctx).tolist() == [[True]] * len(samples)
    # a later task on the same entries leaves their keys alone
    keyed = m.pool.text_keys.detach().clone()
    m.before_task("b", samples, ctx)
    model(**batch)
    m.after_task("b", ctx)
    assert m.entries_of["b"] == mine and m.keyed == mine and torch.equal(m.pool.text_keys, keyed)


def test_a_training_query_leaves_the_answer_out(tmp_path):
    """Training selects with the same query as generation (which has no answer), not with one that
    averages the answer's tokens in."""
    m, model, enc, samples, ctx = _prompted(tmp_path, pool_size=6, diversity=False)
    train, gen = enc.train_batch(samples), enc.generation_batch(samples)
    seen = []
    original = m._queries

    class Spy:  # records what the training forward's query returns; everything else as the original
        def __getattr__(self, name):
            return getattr(original, name)

        def __call__(self, *a, **kw):
            seen.append(original(*a, **kw))
            return seen[-1]

    m._queries = Spy()
    model(**train)
    _, text_train = seen[-1]
    _, text_gen = m.queries(gen["input_ids"], gen["attention_mask"], {"pixel_values": gen["pixel_values"]})
    torch.testing.assert_close(text_train, text_gen)
    _, with_answer = m._queries(train["input_ids"], train["attention_mask"], {"pixel_values": train["pixel_values"]})
    assert not torch.allclose(with_answer, text_gen)


def test_selection_is_deterministic_for_a_seed(tmp_path):
    picks = []
    for seed in (7, 7, 8):
        (tmp_path / str(len(picks))).mkdir()
        m, model, enc, samples, ctx = _prompted(tmp_path / str(len(picks)), seed=seed)
        batch = enc.generation_batch(samples)
        q = m.queries(batch["input_ids"], batch["attention_mask"], {"pixel_values": batch["pixel_values"]})
        picks.append((m.select(*q).tolist(), m.pool.prompts.detach().clone()))
    assert picks[0][0] == picks[1][0] and torch.equal(picks[0][1], picks[1][1])
    assert not torch.equal(picks[0][1], picks[2][1])


def test_batchwise_selection_gives_the_batch_its_most_selected_entries(tmp_path):
    m, model, enc, samples, ctx = _prompted(tmp_path, pool_size=6)
    chosen = torch.tensor([[0, 3], [3, 5], [1, 3], [1, 5], [1, 2]])  # 3 and 1 three times each
    assert m.batchwise(chosen).tolist() == [[1, 3]] * 5
    assert m.batchwise(torch.tensor([[4, 5], [2, 4]])).tolist() == [[2, 4]] * 2  # ties: the lower index
    gen = enc.generation_batch(samples)
    own = m.select(*m.queries(gen["input_ids"], gen["attention_mask"], {"pixel_values": gen["pixel_values"]}))
    model(**enc.train_batch(samples))  # training: the batch-wise selection
    assert torch.equal(m.last_selection, m.batchwise(own))
    with torch.no_grad():  # evaluation: each sample its own
        model(**enc.train_batch(samples))
    assert torch.equal(m.last_selection, own)


def test_diversified_selection_gives_a_new_task_unused_entries(tmp_path):
    m, model, enc, samples, ctx = _prompted(tmp_path, pool_size=6, batchwise=False)
    batch, gen = enc.train_batch(samples), enc.generation_batch(samples)
    q = m.queries(gen["input_ids"], gen["attention_mask"], {"pixel_values": gen["pixel_values"]})  # the training query too
    plain = m.select(*q)
    assert torch.equal(m.select(*q, diversify=True), plain)  # nothing used yet: the plain selection
    m.before_task("a", samples, ctx)
    model(**batch)  # a training forward (grad enabled) counts its selections
    m.after_task("a", ctx)
    assert m.usage.tolist() == torch.bincount(plain.flatten(), minlength=6).double().tolist()
    assert m.usage_by_task == {"a": [int(c) for c in m.usage.tolist()]}
    fresh = m.select(*q, diversify=True)
    assert not set(fresh.flatten().tolist()) & set(plain.flatten().tolist())  # entries task a left unused
    with torch.no_grad():  # even an old entry keyed exactly to the queries loses to the unused ones
        m.pool.image_keys[plain[0]] = q[0][0]
        m.pool.text_keys[plain[0]] = q[1][0]
    assert torch.equal(m.select(*q, diversify=True), fresh) and torch.equal(m.select(*q)[0], plain[0])
    assert torch.equal(m.select(*q), plain)  # inference matches keys alone
    with torch.no_grad():  # an evaluation forward neither diversifies nor counts
        m.before_task("b", samples, ctx)
        model(**batch)
        m.after_task("b", ctx)
    assert torch.equal(m.last_selection, plain) and sum(m.usage_by_task["b"]) == 0
    # with diversity off, training selects as inference does
    off, model_off, *_ = _prompted(tmp_path, pool_size=6, diversity=False, batchwise=False)
    off.usage = m.usage.clone()
    model_off(**batch)
    assert torch.equal(off.last_selection, plain)


@pytest.mark.parametrize("depth", [1, 2])
def test_batched_generation_with_prompts_matches_one_by_one(tmp_path, depth):
    from mcit.evaluate import generate

    m, model, enc, samples, ctx = _prompted(tmp_path, depth=depth)
    torch.manual_seed(1)
    with torch.no_grad():
        m.pool.prompts.mul_(50)  # make the prompts matter for the output
        if depth > 1:
            m.pool.layer_prompts.mul_(50)
    seen = []
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["inputs_embeds"].detach().clone()),
                                          with_kwargs=True)
    together = generate(model, enc, samples, 2, 6, torch.device("cpu"), m, ctx)
    handle.remove()
    prefill = seen[0]  # left-padded: each row's placeholders sit right after its <s>
    batch = enc.generation_batch(samples)
    for row in range(2):
        start = int((batch["attention_mask"][row] == 0).sum()) + 1
        got = prefill[row, start : start + 4]
        assert any(torch.allclose(got, m.pool.prompts[list(c)].reshape(4, -1))
                   for c in [(i, j) for i in range(4) for j in range(i + 1, 4)]), "prompts not in the prefill"
    assert all(e.shape[1] == 1 for e in seen[1:])  # decoding steps reuse the cache
    alone = [generate(model, enc, [s], 1, 6, torch.device("cpu"), m, ctx)[0] for s in samples]
    assert together == alone


@pytest.mark.parametrize("name,depth,key_fit", [("prompt_pool", 1, "loss"), ("prompt_pool", 1, "exact"),
                                                ("fwd_prompt", 1, "loss"), ("fwd_prompt", 2, "loss")])
def test_prompt_methods_run_and_resume_exactly(smoke_cfg, tmp_path, monkeypatch, name, depth, key_fit):
    from mcit.methods import get_method

    cfg = smoke_cfg(f"method.name={name}", "train.lr=0.05", f"method.depth={depth}", f"model.tiny.text_layers={depth}",
                    f"method.key_fit={key_fit}", "method.keys=2", "method.key_samples=32")
    whole = run(cfg, tmp_path / "whole", show_progress=False)
    assert whole["parameters"]["trainable"] < 0.05 * whole["parameters"]["total"]
    resumed = kill_and_resume(cfg, tmp_path / "killed", get_method(name), 2, 3, monkeypatch)
    assert resumed["matrix"] == whole["matrix"]
    usage = whole["method_report"]["selections_per_entry"]
    assert list(usage) == ["color", "count", "ocr"] and resumed["method_report"] == whole["method_report"]
    assert sum(usage["color"]) == 10 * 16 * 2  # steps x batch x top_k
    routing = whole["method_report"]["routing_accuracy"]
    assert set(routing) == {"1", "2", "3"} and set(routing["3"]) == {"color", "count", "ocr"}
    if key_fit == "exact":
        assert resumed["method_report"]["entries_of_task"] == whole["method_report"]["entries_of_task"]
    if name == "fwd_prompt":
        meta = json.loads((tmp_path / "whole" / "checkpoints" / "stage_03_ocr" / "method.json").read_text())
        assert len(meta["old_rank"]) == depth and min(meta["old_rank"] + meta["pre_rank"]) >= 1
        from safetensors.torch import load_file

        a = load_file(str(tmp_path / "whole" / "checkpoints" / "stage_03_ocr" / "method.safetensors"))
        b = load_file(str(tmp_path / "killed" / "checkpoints" / "stage_03_ocr" / "method.safetensors"))
        keys = [k for k in a if "basis" in k]
        # equal to rounding: MKL's last bits follow memory layout and load (the matrix is exact above)
        assert len(keys) == 2 * depth and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in keys)
