"""The chain schedule of ``fused:chain<L>`` (``tdcompile/kernels/gemm_all_reduce_chain.py``) as a
specification, run on the CPU: the schedule itself is plain Python; the data flow below replays
each rank's steps with CPU tensors in the order the GPU streams would run them."""
import pytest
import torch

pytest.importorskip("triton")
from tdcompile.kernels.gemm_all_reduce_chain import owner, schedule  # noqa: E402
from tdcompile.ops.overlap import chunk_bounds, parse_chain  # noqa: E402


@pytest.mark.parametrize("W", [2, 4, 8])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_every_rank_visits_every_chunk_once_and_each_chunk_ends_at_its_owner(W, L):
    for r in range(W):
        steps = schedule(W, r, L)
        assert sorted(c for c, _ in steps) == list(range(W * L))          # the full K-split product, once
        assert [p for _, p in steps] == sorted(p for _, p in steps)          # positions in order
        for c, p in steps:
            assert (r - 1 - p) % W == c % W
            assert (p == W - 1) == (owner(c, W) == r)                        # the last position is the owner


@pytest.mark.parametrize("W", [2, 4, 8])
@pytest.mark.parametrize("L", [1, 2])
def test_each_step_needs_a_push_made_L_steps_earlier(W, L):
    """Position p of chunk c on rank r reads what rank r-1 made at position p-1, L steps before:
    with L >= 2 a whole GEMM chunk hides each push."""
    for r in range(W):
        for s, (c, p) in enumerate(schedule(W, r, L)):
            if p == 0:
                continue
            prev = schedule(W, (r - 1) % W, L)
            assert prev[s - L] == (c, p - 1)


@pytest.mark.parametrize("W,L,M", [(2, 2, 4096), (2, 1, 1000), (4, 2, 4096), (4, 1, 1500), (8, 1, 2048)])
def test_the_data_flow_gives_every_rank_the_sum(W, L, M):
    """Step s of every rank runs after step s-1 of every rank (the streams' order); a rank
    adds its product to what its predecessor pushed; the owner pushes the sum into every peer's
    receive area, which each rank copies into its output at the end."""
    N, K = 16, 8
    g = torch.Generator().manual_seed(W * 10 + L)
    bounds = chunk_bounds(M, W * L)
    assert bounds is not None
    a = [torch.randn(M, K, generator=g, dtype=torch.float64) for _ in range(W)]
    b = torch.randn(K, N, generator=g, dtype=torch.float64)
    recv = [torch.full((M, N), float("nan"), dtype=torch.float64) for _ in range(W)]
    out = [torch.full((M, N), float("nan"), dtype=torch.float64) for _ in range(W)]
    steps = [schedule(W, r, L) for r in range(W)]
    pushed: dict = {}
    for s in range(W * L):
        for r in range(W):
            c, p = steps[r][s]
            lo, hi = bounds[c]
            if p == 0:
                part = a[r][lo:hi] @ b
            else:
                assert pushed[(c, p - 1)] < s                          # made by rank r-1 at an earlier step
                part = recv[r][lo:hi] + a[r][lo:hi] @ b
            if p < W - 1:
                recv[(r + 1) % W][lo:hi] = part
                pushed[(c, p)] = s
            else:
                for q in range(W):                                     # the owner's final: to every rank
                    recv[q][lo:hi] = part
                out[r][lo:hi] = part
    for r in range(W):                                                 # the end: the peers' rows into out
        for c, (lo, hi) in enumerate(bounds):
            if owner(c, W) != r:
                out[r][lo:hi] = recv[r][lo:hi]
    want = sum(x @ b for x in a)
    for r in range(W):
        torch.testing.assert_close(out[r], want)
        assert torch.equal(out[r], out[0])                             # the same bits on every rank


def test_variant_names():
    assert parse_chain("chain2") == 2 and parse_chain("chain1") == 1
    assert parse_chain("chain0") is None and parse_chain("ce2") is None and parse_chain("chain") is None


@pytest.mark.parametrize("W", [2, 4, 8])
def test_flag_words_of_chunks_and_the_entry_barrier_do_not_overlap_and_stay_in_their_channel(W):
    """A chunk's PART / FINAL flag is word ``c * W + sender`` of its channel; the entry barrier
    (``block_barrier`` at slot ``PREV_SLOT``) uses words ``PREV_SLOT * W + rank``."""
    from tdcompile.kernels import gemm_all_reduce_chain as k
    from tdcompile.kernels.symm import MAX_WORLD, PAD_SLOTS
    chunk_words = {c * W + s for c in range(k.MAX_CHUNKS) for s in range(W)}
    prev_words = {int(k.PREV_SLOT) * W + s for s in range(W)}
    assert not chunk_words & prev_words
    assert max(chunk_words | prev_words) < PAD_SLOTS * MAX_WORLD              # one channel's stride
