"""The decode step as a torch custom op (tactic.torch_ops): torch.compile(fullgraph=True) keeps
it in the graph, compiled results match eager ones and a float64 NumPy reference, and the
decoder's mutation is neither removed nor reordered by the compiler."""
import numpy as np
import pytest

import tactic
from conftest import ref_attention

torch = pytest.importorskip("torch")
torch_ops = pytest.importorskip("tactic.torch_ops")

HQ, HKV, D, DM, N = 4, 2, 32, 48, 90


def _decoder(k, v, **kw):
    dec = tactic.SparseDecoder(1, HQ, HKV, D, max_tokens=N + 16, dtype="float32", target=1.0, **kw)
    dec.prefill(0, k, v)
    return dec


def _context(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, HKV, D, generator=g), torch.randn(N, HKV, D, generator=g)


class TinyAttention(torch.nn.Module):
    """One attention block: projections around a Tactic decode step."""

    def __init__(self, h, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.h = h
        self.register_buffer("wq", torch.randn(HQ * D, DM, generator=g) * 0.2)
        self.register_buffer("wk", torch.randn(HKV * D, DM, generator=g) * 0.2)
        self.register_buffer("wv", torch.randn(HKV * D, DM, generator=g) * 0.2)
        self.register_buffer("wo", torch.randn(DM, HQ * D, generator=g) * 0.2)

    def forward(self, x):  # x [1, DM]
        q = (x @ self.wq.T).view(1, HQ, D)
        k = (x @ self.wk.T).view(1, HKV, D)
        v = (x @ self.wv.T).view(1, HKV, D)
        o = self.h.decode(0, q, k, v)
        return torch.relu(o.reshape(1, HQ * D) @ self.wo.T) + x


def _reference(mod, k, v, xs):
    """float64 NumPy: the same block over the prompt plus every appended token."""
    w = {n: getattr(mod, n).double().numpy() for n in ("wq", "wk", "wv", "wo")}
    kk, vv, outs = k.double().numpy(), v.double().numpy(), []
    for x in xs:
        x = x.double().numpy()
        q = (x @ w["wq"].T).reshape(HQ, D)
        kk = np.concatenate([kk, (x @ w["wk"].T).reshape(1, HKV, D)])
        vv = np.concatenate([vv, (x @ w["wv"].T).reshape(1, HKV, D)])
        o, _ = ref_attention(q, kk, vv, D ** -0.5)
        outs.append(np.maximum(o.reshape(1, HQ * D) @ w["wo"].T, 0) + x)
    return outs


def test_no_graph_break():
    k, v = _context()
    mod = TinyAttention(torch_ops.handle(_decoder(k, v)))
    ex = torch._dynamo.explain(mod)(torch.randn(1, DM))
    assert ex.graph_break_count == 0 and ex.graph_count == 1
    assert "tactic.decode" in str(ex.graphs[0].graph) or "tactic::decode" in str(ex.graphs[0].graph)


def test_compiled_module_matches_eager_and_float64():
    """fullgraph=True (a graph break would raise); three steps compiled on one decoder, the
    same three eager on a twin: equal outputs, equal decoder state, both at the float64
    reference."""
    torch._dynamo.reset()
    k, v = _context()
    dec_c, dec_e = _decoder(k, v), _decoder(k, v)
    mod_c = TinyAttention(torch_ops.handle(dec_c))
    mod_e = TinyAttention(torch_ops.handle(dec_e))
    compiled = torch.compile(mod_c, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, DM, generator=g) for _ in range(3)]
    with torch.no_grad():
        out_c = [compiled(x) for x in xs]
        out_e = [mod_e(x) for x in xs]
    refs = _reference(mod_c, k, v, xs)
    for oc, oe, ref in zip(out_c, out_e, refs):
        np.testing.assert_allclose(oc.numpy(), oe.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(oc.double().numpy(), ref, rtol=1e-4, atol=1e-4)
    assert dec_c.length(0) == dec_e.length(0) == N + 3
    assert int(torch_ops.handle(dec_c).state) == 3


def test_compiler_keeps_unused_steps_and_their_order():
    """A step whose output is unused still appends (not dead code), and the second step of
    the graph sees the first's token (calls on one decoder stay in program order)."""
    torch._dynamo.reset()
    k, v = _context(3)
    dec = _decoder(k, v)
    h = torch_ops.handle(dec)

    def two_steps(q1, k1, v1, q2, k2, v2):
        h.decode(0, q1, k1, v1)
        return h.decode(0, q2, k2, v2) + 0.0

    g = torch.Generator().manual_seed(4)
    args = [torch.randn(1, H, D, generator=g) for H in (HQ, HKV, HKV, HQ, HKV, HKV)]
    out = torch.compile(two_steps, fullgraph=True)(*args)
    assert dec.length(0) == N + 2 and int(h.state) == 2
    kk = np.concatenate([k.double().numpy(), args[1].double().numpy(), args[4].double().numpy()])
    vv = np.concatenate([v.double().numpy(), args[2].double().numpy(), args[5].double().numpy()])
    ref, _ = ref_attention(args[3][0].double().numpy(), kk, vv, D ** -0.5)
    np.testing.assert_allclose(out[0].double().numpy(), ref, rtol=1e-4, atol=2e-5)


def test_opcheck_schema_fake_and_mutation():
    """torch.library.opcheck: the declared schema (mutates `state` only), the fake
    implementation's shape/dtype and the dispatcher registrations agree with the real op.
    k_new = v_new = None: attend without appending, so repeated calls see the same store."""
    k, v = _context(5)
    dec = _decoder(k, v)
    h = torch_ops.handle(dec)
    q = torch.randn(1, HQ, D)
    torch.library.opcheck(torch.ops.tactic.decode.default, (h.state, h.id, 0, q, None, None, None, None))
    assert dec.length(0) == N


def test_fake_output_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode
    k, v = _context(6)
    h = torch_ops.handle(_decoder(k, v))
    with FakeTensorMode() as mode:
        q = mode.from_tensor(torch.randn(2, HQ, D, dtype=torch.float16))
        out = torch.ops.tactic.decode(mode.from_tensor(h.state), h.id, 0, q, None, None, None, None)
    assert out.shape == (2, HQ, D) and out.dtype == torch.float16


def test_errors_leave_decoder_and_state_unchanged():
    k, v = _context(7)
    dec = _decoder(k, v)
    h = torch_ops.handle(dec)
    with pytest.raises(ValueError, match="`layer` must be in \\[0, 1\\)"):
        h.decode(3, torch.randn(1, HQ, D), torch.randn(1, HKV, D), torch.randn(1, HKV, D))
    assert dec.length(0) == N and int(h.state) == 0
    with pytest.raises(ValueError, match="names no live SparseDecoder"):
        torch.ops.tactic.decode(h.state, 10**9, 0, torch.randn(1, HQ, D), None, None, None, None)
    with pytest.raises(TypeError, match="`dec` must be a tactic.SparseDecoder"):
        torch_ops.handle(object())
    assert torch_ops.handle(dec) is h
