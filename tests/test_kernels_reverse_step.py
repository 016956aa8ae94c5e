"""The fused reverse step vs eq. 5 written out in torch with the same z, and the statistics and
bookkeeping of its in-kernel Philox noise. TRITON_INTERPRET=1 on a CPU-only machine."""
import math
import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastddpm.kernels.reverse_step import reverse_step, reverse_step_noise  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = 1000
SHAPE = (3, 3, 13, 11)  # 1287 elements: more than one program, not a multiple of the block


@pytest.fixture(scope="module")
def tables():
    """The paper's linear schedule beta in [1e-4, 0.02] and the three per-step coefficients."""
    beta = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    alpha = 1 - beta
    alpha_bar = torch.cumprod(alpha, 0)
    tab = dict(inv_sqrt_alpha=1 / alpha.sqrt(), eps_coef=beta / (1 - alpha_bar).sqrt(), sigma=beta.sqrt())
    return {k: v.to(device=DEVICE, dtype=torch.float32) for k, v in tab.items()}


def _step_tensor(v):
    return torch.tensor([v], device=DEVICE, dtype=torch.int64)


def _inputs(dtype=torch.float32, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    eps = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return x, eps


def _eq5(x, eps, t, z, tables):
    """eq. 5 in fp32: (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t) + sigma_t * z."""
    return ((x.float() - tables["eps_coef"][t] * eps.float()) * tables["inv_sqrt_alpha"][t]
            + tables["sigma"][t] * z)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("step", [T - 1, 500, 1])
def test_matches_eq5(tables, dtype, atol, step):
    x, eps = _inputs(dtype)
    t, seed = _step_tensor(step), _step_tensor(1234)
    out = reverse_step(x, eps, t, seed, **tables)
    z = reverse_step_noise(x.shape, t, seed)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), _eq5(x, eps, step, z, tables), atol=atol, rtol=atol)


def test_noise_is_standard_normal():
    """Over 2^16 elements: mean 0 and variance 1 within ~5 standard errors, Gaussian mass within
    one sigma and the fourth moment, and no correlation between steps or seeds."""
    n = 1 << 16
    z = reverse_step_noise((n,), _step_tensor(700), _step_tensor(7)).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 5 * 0.47 * se
    assert abs(z.pow(4).mean().item() - 3) < 5 * math.sqrt(96) * se
    for other in (reverse_step_noise((n,), _step_tensor(699), _step_tensor(7)),
                  reverse_step_noise((n,), _step_tensor(700), _step_tensor(8))):
        assert abs(torch.corrcoef(torch.stack([z, other.double()]))[0, 1].item()) < 5 * se


def test_deterministic_and_fresh_per_step_and_seed(tables):
    x, eps = _inputs()
    run = lambda step, seed: reverse_step(x, eps, _step_tensor(step), _step_tensor(seed), **tables)  # noqa: E731
    assert torch.equal(run(10, 1), run(10, 1))
    assert not torch.allclose(run(10, 1), run(11, 1))
    assert not torch.allclose(run(10, 1), run(10, 2))
    # the noise itself, not only the coefficients, changes with the step
    z10 = reverse_step_noise(SHAPE, _step_tensor(10), _step_tensor(1))
    z11 = reverse_step_noise(SHAPE, _step_tensor(11), _step_tensor(1))
    assert (z10 != z11).float().mean() > 0.99


def test_no_noise_at_last_step(tables):
    x, eps = _inputs()
    t, seed = _step_tensor(0), _step_tensor(5)
    assert torch.count_nonzero(reverse_step_noise(SHAPE, t, seed)) == 0
    out = reverse_step(x, eps, t, seed, **tables)
    torch.testing.assert_close(out, _eq5(x, eps, 0, torch.zeros_like(out), tables), atol=1e-6, rtol=1e-6)


def test_chunks_with_offsets_reproduce_one_call(tables):
    """Noise depends on (seed, t, global element index) only: batches of any size agree."""
    x, eps = _inputs(shape=(5, 3, 8, 9))
    t, seed = _step_tensor(321), _step_tensor(99)
    whole = reverse_step(x, eps, t, seed, **tables)
    per_image = x[0].numel()
    parts = [reverse_step(x[a:b], eps[a:b], t, seed, offset=a * per_image, **tables) for a, b in ((0, 2), (2, 5))]
    assert torch.equal(torch.cat(parts), whole)
    # and without the offset a chunk draws different noise
    assert not torch.equal(reverse_step(x[2:5], eps[2:5], t, seed, **tables), whole[2:5])


def test_high_offset_bits_are_used():
    """Element indices past 2^32 (the counter's second word) do not repeat the noise of index 0."""
    t, seed = _step_tensor(3), _step_tensor(3)
    z0 = reverse_step_noise((64,), t, seed)
    assert torch.equal(z0, reverse_step_noise((64,), t, seed, offset=0))
    assert not torch.equal(z0, reverse_step_noise((64,), t, seed, offset=1 << 32))


def test_clamp_and_out(tables):
    x, eps = _inputs()
    x = x * 3
    t, seed = _step_tensor(999), _step_tensor(4)
    free = reverse_step(x, eps, t, seed, **tables)
    assert free.abs().max() > 1
    clamped = reverse_step(x, eps, t, seed, clip=1.0, **tables)
    torch.testing.assert_close(clamped, free.clamp(-1, 1), atol=0, rtol=0)
    buf = x.clone()  # in place: out may be x_t itself
    assert reverse_step(buf, eps, t, seed, clip=1.0, out=buf, **tables) is buf
    assert torch.equal(buf, clamped)


def test_python_int_step_and_seed(tables):
    x, eps = _inputs()
    assert torch.equal(reverse_step(x, eps, 42, 17, **tables),
                       reverse_step(x, eps, _step_tensor(42), _step_tensor(17), **tables))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_draws_fresh_noise(tables):
    """One graph captured once, replayed with t updated in place, matches eager calls step by step."""
    x, eps = _inputs()
    t, seed, offset = _step_tensor(999), _step_tensor(11), _step_tensor(0)
    out = torch.empty_like(x)
    reverse_step(x, eps, t, seed, offset=offset, out=out, **tables)  # warm up (compiles the kernel)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with pytest.raises(ValueError, match="device tensors"):  # a Python int would be baked in
            reverse_step(x, eps, t, seed, out=out, **tables)
        reverse_step(x, eps, t, seed, offset=offset, out=out, **tables)
    outs = []
    for step in (999, 998, 0):
        t.fill_(step)
        graph.replay()
        outs.append(out.clone())
        torch.testing.assert_close(out, reverse_step(x, eps, step, 11, **tables), atol=0, rtol=0)
    assert not torch.equal(outs[0], outs[1])


# --- the noise stream, from its counters: an independent Philox4x32-10 (Salmon et al. 2011) --------

def _philox4x32_10(key: int, counters: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of (N, 4) uint32 counters under a 64-bit key (lo word first, as curand and
    Triton split it): (N, 4) uint32 outputs."""
    m0, m1, w0, w1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), 0x9E3779B9, 0xBB67AE85
    c = counters.astype(np.uint64)
    k0, k1 = key & 0xFFFFFFFF, key >> 32
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = m0 * c[:, 0], m1 * c[:, 2]  # 32 x 32 -> 64-bit products
        c = np.stack([(p1 >> np.uint64(32)) ^ c[:, 1] ^ np.uint64(k0), p1 & mask,
                      (p0 >> np.uint64(32)) ^ c[:, 3] ^ np.uint64(k1), p0 & mask], axis=1)
        k0, k1 = (k0 + w0) & 0xFFFFFFFF, (k1 + w1) & 0xFFFFFFFF
    return c.astype(np.uint32)


def _box_muller(r0: np.ndarray, r1: np.ndarray) -> np.ndarray:
    """The first normal of a pair of uint32 words, as Triton's uint_to_uniform_float and
    pair_uniform_to_normal compute it."""
    def uniform(r):
        i = r.view(np.int32).astype(np.int64)
        return np.where(i < 0, -i - 1, i).astype(np.float64) * 4.6566127342e-10

    u1, u2 = np.maximum(1e-7, uniform(r0)), uniform(r1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)


def _counters(idx: np.ndarray, t: int, stream: int) -> np.ndarray:
    return np.stack([idx & 0xFFFFFFFF, idx >> 32, np.full_like(idx, t), np.full_like(idx, stream)], 1).astype(np.uint32)


def test_noise_stream_is_disjoint_from_torch_cuda_randn():
    """z for element i at step t is Philox4x32-10(key=seed, counter=(i lo, i hi, t, NOISE_STREAM)).
    PyTorch's CUDA randn draws x_T from the same generator family with the same key, at counters
    (offset/4 lo, offset/4 hi, thread lo, thread hi = 0): ATen's distribution kernels call
    curand_init(seed, subsequence=thread index, offset) (aten/src/ATen/native/cuda/
    DistributionTemplates.h), and curand puts the subsequence in counter words 2-3 and the offset
    in words 0-1 (curand_philox4x32_x.h). The kernel's fourth word is a nonzero constant, so no
    counter it uses is one torch uses, whatever the seed, t, offset or grid."""
    from fastddpm.kernels.reverse_step import NOISE_STREAM

    assert NOISE_STREAM != 0 and NOISE_STREAM < 2 ** 32
    seed, t, offset = 0x1234_5678_9ABC, 7, 2 ** 32 - 5  # elements straddle the 32-bit boundary
    z = reverse_step_noise((3, 5), t, seed, offset=offset, device=DEVICE).cpu().numpy().reshape(-1)
    idx = offset + np.arange(z.size, dtype=np.uint64)
    words = _philox4x32_10(seed, _counters(idx, t, NOISE_STREAM))
    np.testing.assert_allclose(z, _box_muller(words[:, 0], words[:, 1]), rtol=1e-4, atol=1e-4)
    # before the fix the fourth word was 0: exactly the blocks torch's thread t uses for x_T
    shared = _philox4x32_10(seed, _counters(idx, t, 0))
    assert not np.allclose(z, _box_muller(shared[:, 0], shared[:, 1]), atol=1e-3)
