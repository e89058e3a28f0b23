"""``dot_product_attention(implementation="blockwise")``: flash-style attention against the plain path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moee_jax.nn.attention import IMPLEMENTATIONS, Attention, dot_product_attention

# Small blocks so that a few dozen tokens already span several query and key blocks.
BLOCKS = dict(block_q=16, block_k=16)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def qkv(lq, lk, *, b=2, h=3, d=8, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.standard_normal((b, n, h, d)), dtype) for n in (lq, lk, lk))
    return q, k, v


def key_mask(b, lk, *, seed=1):
    """Per-sample key mask like the reference-drop mask: row 0 keeps every key, row 1 loses the last 30%."""
    keep = np.ones((b, lk), bool)
    keep[1, int(0.7 * lk) :] = False
    keep[1, np.random.default_rng(seed).random(lk) < 0.2] = False
    keep[:, 0] = True  # never a fully masked row: that is where the two paths differ by design
    return jnp.asarray(keep)[:, None, None, :]


CASES = {
    # name: (Lq, Lk, masked); 50 and 77 are not multiples of the block of 16
    "self": (50, 50, False),
    "self_masked": (50, 50, True),
    "cross": (50, 77, False),  # e.g. 77 text-context tokens
    "cross_masked": (37, 77, True),  # e.g. self-attention with appended reference tokens, dropped per sample
    "single_block": (9, 12, True),
}


@pytest.mark.parametrize("name", CASES)
def test_forward_and_gradients_match_xla(name):
    lq, lk, masked = CASES[name]
    q, k, v = qkv(lq, lk)
    mask = key_mask(q.shape[0], lk) if masked else None
    w = jnp.asarray(np.random.default_rng(2).standard_normal((q.shape[0], lq, q.shape[2], q.shape[3])), jnp.float32)

    def loss(impl):
        return lambda q, k, v: jnp.sum(w * dot_product_attention(q, k, v, mask, implementation=impl, **BLOCKS))

    ref = dot_product_attention(q, k, v, mask, implementation="xla")
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, implementation="blockwise", **BLOCKS))(q, k, v)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 1e-5
    grads_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    grads = jax.jit(jax.grad(loss("blockwise"), argnums=(0, 1, 2)))(q, k, v)
    for g, g_ref, what in zip(grads, grads_ref, "qkv"):
        assert rel_err(g, g_ref) < 1e-5, f"d{what}"


def test_full_mask_shapes_and_query_dependent_mask():
    """A full (B, H, Lq, Lk) mask, e.g. causal, blocked along both axes."""
    q, k, v = qkv(40, 40, b=1, h=2)
    mask = jnp.tril(jnp.ones((40, 40), bool))[None, None]
    ref = dot_product_attention(q, k, v, mask, implementation="xla")
    out = dot_product_attention(q, k, v, mask, implementation="blockwise", **BLOCKS)
    assert rel_err(out, ref) < 1e-5


def test_fully_masked_rows_give_zeros_without_nan():
    q, k, v = qkv(40, 40, b=1, h=1)
    mask = jnp.zeros((1, 1, 40, 40), bool).at[:, :, :20].set(True)  # queries 20.. see no key
    f = lambda q, k, v: dot_product_attention(q, k, v, mask, implementation="blockwise", **BLOCKS)  # noqa: E731
    out = f(q, k, v)
    np.testing.assert_array_equal(out[:, 20:], 0.0)
    assert rel_err(out[:, :20], dot_product_attention(q, k, v, mask, implementation="xla")[:, :20]) < 1e-5
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    np.testing.assert_array_equal(grads[0][:, 20:], 0.0)


def test_bf16_inputs_give_bf16_output_close_to_fp32():
    q, k, v = qkv(50, 77, dtype=jnp.bfloat16)
    mask = key_mask(2, 77)
    out = dot_product_attention(q, k, v, mask, implementation="blockwise", **BLOCKS)
    assert out.dtype == jnp.bfloat16
    f32 = [t.astype(jnp.float32) for t in (q, k, v)]
    assert rel_err(out, dot_product_attention(*f32, mask, implementation="xla")) < 2e-2
    grads = jax.grad(lambda q: jnp.sum(dot_product_attention(q, k, v, mask, implementation="blockwise", **BLOCKS)))(q)
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32))))


def test_attention_module_blockwise_matches_xla():
    """The multi-head module under jit, with appended reference tokens dropped for one sample."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 150, 32)), jnp.float32)  # 150 + 20 keys > 128
    ref_tokens = jnp.asarray(np.random.default_rng(4).standard_normal((2, 20, 32)), jnp.float32)
    keep = jnp.array([True, False])
    modules = {impl: Attention(heads=4, head_dim=8, implementation=impl) for impl in ("xla", "blockwise")}
    params = modules["xla"].init(jax.random.key(0), x, extra_kv=ref_tokens, extra_kv_keep=keep)

    def run(impl):
        fn = lambda p: modules[impl].apply(p, x, extra_kv=ref_tokens, extra_kv_keep=keep)  # noqa: E731
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.square(fn(p)))))(params), fn(params)

    (loss_ref, grads_ref), out_ref = run("xla")
    (loss, grads), out = run("blockwise")
    assert rel_err(out, out_ref) < 1e-5
    assert abs(float(loss) - float(loss_ref)) < 1e-5 * abs(float(loss_ref))
    for g, g_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        assert rel_err(g, g_ref) < 1e-5


def test_unknown_implementation_lists_blockwise():
    assert "blockwise" in IMPLEMENTATIONS
    q, k, v = qkv(4, 4)
    with pytest.raises(ValueError, match="blockwise"):
        dot_product_attention(q, k, v, implementation="flash")
