"""Un-graphed fused op calls replayed as CUDA graphs (``ops/op_graphs.py``): when a call runs
eagerly, when it is captured, when it is replayed, and what makes an old graph void.

The policy is tested here with a stand-in for the capture (no GPU); the real graphs are tested
on GPUs by ``tests/gpu/test_op_graphs_real.py`` (results equal to unfused while inputs change)."""
import pytest
import torch

from tdcompile.ops import op_graphs


class _Graph:
    def __init__(self, body):
        self.body, self.replays = body, 0

    def replay(self):
        self.replays += 1


class _Ws:
    def __init__(self, name="g"):
        self.name, self.generation, self.checks, self.broken = name, 0, 0, False

    def check(self):
        self.checks += 1
        if self.broken:
            raise RuntimeError("tdist::all_reduce: rank 0 timed out waiting for a peer")


@pytest.fixture
def fake_capture(monkeypatch):
    captured = []

    def capture(tag, body):
        if tag[0] == "fails":
            return None
        captured.append(_Graph(body))
        return captured[-1]
    monkeypatch.setattr(op_graphs, "_capture", capture)
    op_graphs.clear()
    op_graphs.STATS.clear()
    yield captured
    op_graphs.clear()


def _call(ws, x, out, tag=("all_reduce", "fused:two_shot", ()), *extra):
    ran = []
    how = op_graphs.launch(ws, tag, (x, out, *extra), lambda: ran.append(1))
    return how, bool(ran)


def test_first_sighting_runs_eagerly_the_second_captures_later_ones_replay(fake_capture):
    ws, x, out = _Ws(), torch.zeros(8), torch.zeros(8)
    assert _call(ws, x, out) == ("eager", True)
    assert _call(ws, x, out) == ("capture", False)       # captured (not run), then replayed once
    assert _call(ws, x, out) == ("replay", False)
    assert _call(ws, x, out) == ("replay", False)
    assert len(fake_capture) == 1 and fake_capture[0].replays == 3
    assert ws.checks == 2                                 # a recorded peer timeout is looked for before each replay


def test_other_addresses_strides_or_scalars_are_another_call_site(fake_capture):
    ws, x, out = _Ws(), torch.zeros(8, 4), torch.zeros(8, 4)
    for _ in range(3):
        _call(ws, x, out)
    assert _call(ws, x, torch.zeros(8, 4)) == ("eager", True)          # a new output buffer
    assert _call(ws, x.t(), out) == ("eager", True)                     # same address, other strides
    assert _call(ws, x, out, ("all_reduce", "fused:two_shot", ()), 1e-5) == ("eager", True)   # eps
    assert _call(ws, x, out, ("all_reduce", "fused:one_shot", ())) == ("eager", True)          # impl


def test_a_grown_region_voids_every_graph_of_its_workspace(fake_capture):
    ws, other, x, out = _Ws("g"), _Ws("h"), torch.zeros(8), torch.zeros(8)
    for w in (ws, other):
        for _ in range(3):
            _call(w, x, out)
    ws.generation += 1                                    # Workspace.region reallocated something
    assert _call(ws, x, out) == ("eager", True)
    assert op_graphs.STATS["dropped"] == 1
    assert _call(other, x, out) == ("replay", False)      # the other group's graph still holds
    assert _call(ws, x, out) == ("capture", False)


def test_a_failed_capture_leaves_that_call_site_eager_for_good(fake_capture):
    ws, x, out = _Ws(), torch.zeros(8), torch.zeros(8)
    tag = ("fails", "fused:ce", ())
    assert [_call(ws, x, out, tag) for _ in range(4)] == [("eager", True)] * 4
    assert not fake_capture


def test_a_peer_timeout_raises_instead_of_replaying(fake_capture):
    ws, x, out = _Ws(), torch.zeros(8), torch.zeros(8)
    for _ in range(2):
        _call(ws, x, out)
    ws.broken = True
    with pytest.raises(RuntimeError, match="rank 0 timed out"):
        _call(ws, x, out)
    assert fake_capture[0].replays == 1                   # only the replay right after its capture


def test_a_timeout_a_kernel_wrote_into_the_error_word_raises_before_the_next_replay(fake_capture):
    pytest.importorskip("triton")                         # decoding the word imports the kernels' helpers
    from tdcompile.kernels import symm

    class Ws:                                             # the real error word and Workspace.check
        name, generation, world, rank, broken = "g", 0, 2, 0, False
        check = symm.Workspace.check

        def __init__(self):
            self.err = torch.zeros(4, dtype=torch.int32)
    ws, x, out = Ws(), torch.zeros(8), torch.zeros(8)
    assert [_call(ws, x, out)[0] for _ in range(3)] == ["eager", "capture", "replay"]
    ws.err[0] = (1 << 16) | (1 << 8) | 1                  # op 0, rank 1, a barrier: what a kernel writes
    with pytest.raises(RuntimeError, match="rank 1 timed out waiting for a barrier"):
        _call(ws, x, out)
    with pytest.raises(RuntimeError, match="timed out"):  # and on every later call: the workspace is broken
        _call(ws, x, out)
    assert ws.broken and fake_capture[0].replays == 2


def test_least_recently_replayed_graphs_are_dropped_beyond_the_bound(fake_capture, monkeypatch):
    monkeypatch.setattr(op_graphs, "MAX_GRAPHS", 2)
    ws, outs, x = _Ws(), [torch.zeros(8) for _ in range(3)], torch.zeros(8)
    for o in outs:
        for _ in range(2):
            _call(ws, x, o)
    assert op_graphs.STATS["dropped"] == 1 and len(op_graphs._GRAPHS) == 2
    assert _call(ws, x, outs[2]) == ("replay", False)
    assert _call(ws, x, outs[0]) == ("capture", False)    # dropped, still remembered: captured again


def test_a_signature_whose_captures_are_never_replayed_stops_capturing(fake_capture, monkeypatch):
    monkeypatch.setattr(op_graphs, "CHURN_CAPTURES", 4)
    ws, x = _Ws(), torch.zeros(8)
    for _ in range(4):                                    # each output address comes back once only
        out = torch.zeros(8)
        assert [_call(ws, x, out)[0] for _ in range(2)] == ["eager", "capture"]
    out = torch.zeros(8)
    assert [_call(ws, x, out)[0] for _ in range(3)] == ["eager", "eager", "eager"]   # tripped: eager for good
    assert len(fake_capture) == 4 and op_graphs.STATS["unstable"] == 1
    assert _call(ws, x, out, ("all_reduce", "fused:one_shot", ()))[0] == "eager"      # other signatures
    assert _call(ws, x, out, ("all_reduce", "fused:one_shot", ()))[0] == "capture"    # keep capturing


def test_a_model_with_as_many_call_sites_as_the_bound_captures_them_all_and_replays(fake_capture, monkeypatch):
    monkeypatch.setattr(op_graphs, "CHURN_CAPTURES", 4)
    ws, x, outs = _Ws(), torch.zeros(8), [torch.zeros(8) for _ in range(4)]   # 4 layers, one signature
    forwards = [[_call(ws, x, o)[0] for o in outs] for _ in range(5)]
    assert forwards == [["eager"] * 4, ["capture"] * 4] + [["replay"] * 4] * 3
    assert op_graphs.STATS["unstable"] == 0


def test_only_impls_whose_state_lives_on_the_device_are_replayed(monkeypatch):
    assert op_graphs.replayable("all_gather_gemm", "fused:ce")
    assert op_graphs.replayable("gemm_all_reduce_rmsnorm", "fused:two_shot")
    for op, impl in [("all_reduce", "fused:lamport"), ("all_reduce_rmsnorm", "fused:lamport2"),
                     ("gemm_all_reduce", "fused:pipe2"), ("all_gather_gemm", "symm_mem"),
                     ("all_reduce", "unfused")]:
        assert not op_graphs.replayable(op, impl), (op, impl)
    monkeypatch.setenv("TDCOMPILE_OP_GRAPHS", "0")
    assert not op_graphs.replayable("all_gather_gemm", "fused:ce")


def test_turning_replays_off_changes_the_digest_of_host_entries_only(monkeypatch):
    from tdcompile import measured
    on = measured.impl_digest("all_gather_gemm", "host:fused:ce"), measured.impl_digest("all_gather_gemm", "fused:ce")
    assert "ops/op_graphs.py" in measured.impl_files("all_gather_gemm", "host:fused:ce")
    measured._DIGESTS.clear()
    monkeypatch.setenv("TDCOMPILE_OP_GRAPHS", "0")
    off = measured.impl_digest("all_gather_gemm", "host:fused:ce"), measured.impl_digest("all_gather_gemm", "fused:ce")
    measured._DIGESTS.clear()
    assert on[0] != off[0] and on[1] == off[1]


def test_the_op_glue_allocates_outputs_first_and_runs_the_body_inside_an_outer_capture(fake_capture, monkeypatch):
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    ws, x, bodies = _Ws(), torch.ones(4), []
    out_buf = torch.empty(4)                               # what the allocator hands out each call

    def body(w, outs):
        bodies.append(outs[0] is out_buf)
        outs[0].copy_(x * 2)

    run = op_graphs.fused("all_reduce", "fused:two_shot", (), (x,), lambda: (out_buf,), body, lambda o: o[0])
    assert all(run(ws) is out_buf for _ in range(3))
    assert bodies == [True] and op_graphs.STATS == {"eager": 1, "capture": 1, "replay": 1}
    capturing[0] = True                                    # e.g. the Engine capturing a decode step
    run(ws)
    assert bodies == [True, True] and op_graphs.STATS["replay"] == 1
    capturing[0] = False
    lamport = op_graphs.fused("all_reduce", "fused:lamport", (), (x,), lambda: (out_buf,), body, lambda o: o[0])
    lamport(ws)
    assert len(bodies) == 3 and sum(op_graphs.STATS.values()) == 3   # not replayable: the body ran, nothing counted
