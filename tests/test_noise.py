"""Counter-based noise: Philox known answers, the key layout, batch independence, statistics."""
import math
import os

import pytest
import torch

from fastddpm.noise import XT_STEP, noise, philox4x32


def _u32(*values):
    return [torch.tensor(v, dtype=torch.int64) for v in values]


@pytest.mark.parametrize("counter, key, expected", [
    # Known-answer vectors of Random123's philox4x32-10 (kat_vectors).
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(*_u32(*counter), *key)
    assert tuple(int(v) for v in out) == expected


def test_box_muller_of_the_first_two_words():
    """Element e of sample i: Philox counter (e, i, 0, 0), key (seed, step), words 0 and 1 -> one normal."""
    seed, step, i, e = 1234, 77, 5, 9
    r0, r1, _, _ = (int(v) for v in philox4x32(*_u32(e, i, 0, 0), seed, step))

    def uniform(r):  # Triton's uint_to_uniform_float, in float32
        x = r - 2**32 if r >= 2**31 else r
        x = ~x if x < 0 else x
        return torch.tensor(float(torch.tensor(x, dtype=torch.float32)), dtype=torch.float32) * torch.tensor(
            4.6566127342e-10, dtype=torch.float32)

    u1, u2 = max(uniform(r0).item(), 1e-7), uniform(r1).item()
    z = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
    got = noise(seed, step, (i + 1, 3, 2, 2))[i].flatten()[e].item()
    assert got == pytest.approx(z, abs=2e-6)


def test_deterministic_and_keyed():
    a = noise(3, 10, (4, 3, 8, 8))
    assert a.dtype == torch.float32 and a.shape == (4, 3, 8, 8)
    torch.testing.assert_close(a, noise(3, 10, (4, 3, 8, 8)), rtol=0, atol=0)
    for other in (noise(4, 10, a.shape), noise(3, 11, a.shape), noise(3, XT_STEP, a.shape)):
        assert (other - a).abs().mean() > 0.5


def test_independent_of_batch_size_and_sharding():
    full = noise(7, 500, (10, 3, 5, 7))
    torch.testing.assert_close(noise(7, 500, (3, 3, 5, 7), sample_offset=4), full[4:7], rtol=0, atol=0)
    shards = [noise(7, 500, (5, 3, 5, 7), sample_offset=o) for o in (0, 5)]
    torch.testing.assert_close(torch.cat(shards), full, rtol=0, atol=0)


def test_element_index_is_the_flat_chw_index():
    # The same sample drawn as [C, H, W] and as a flat vector gives the same numbers in NCHW order.
    torch.testing.assert_close(noise(1, 2, (2, 3, 4, 5)).reshape(2, -1), noise(1, 2, (2, 60)), rtol=0, atol=0)


def test_dtype_and_device_arguments():
    z32 = noise(0, 0, (2, 8))
    torch.testing.assert_close(noise(0, 0, (2, 8), dtype=torch.float64), z32.double(), rtol=0, atol=0)
    assert noise(0, 0, (2, 8), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_standard_normal_statistics():
    z = noise(11, 3, (64, 4096)).double().flatten()
    n = z.numel()
    # Tolerances: 5 standard errors (mean: 1/sqrt(n); variance: sqrt(2/n); 4th moment: sqrt(96/n)).
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    # Neighbouring elements and samples are uncorrelated.
    zz = noise(11, 3, (64, 4096)).double()
    assert abs((zz[:, 1:] * zz[:, :-1]).mean().item()) < 5 / math.sqrt(zz[:, 1:].numel())
    assert abs((zz[1:] * zz[:-1]).mean().item()) < 5 / math.sqrt(zz[1:].numel())


def test_matches_triton_randn():
    """The documented equivalence: tl.randn(seed | step << 32, e | i << 32) draws the same stream."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and Triton's interpreter is off (tests/conftest.py turns it on)")

    @triton.jit
    def draw(out_ptr, seed, step, offset, per_sample, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        i = offset + idx // per_sample
        e = idx % per_sample
        z = tl.randn(seed.to(tl.int64) | (step.to(tl.int64) << 32), e.to(tl.int64) | (i.to(tl.int64) << 32))
        tl.store(out_ptr + idx, z, mask=idx < n)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, D, seed, step, offset = 3, 50, 2**31 + 5, 999, 7
    out = torch.empty(B * D, device=device)
    draw[(triton.cdiv(B * D, 64),)](out, seed, step, offset, D, B * D, BLOCK=64)
    ref = noise(seed, step, (B, D), sample_offset=offset, device=device)
    torch.testing.assert_close(out.view(B, D), ref, rtol=0, atol=1e-5)
