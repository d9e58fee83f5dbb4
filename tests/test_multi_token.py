"""Multi-token prediction (heads.next_item.horizon / half_life_s / utility) against brute-force references: the
pairs and weights of a jagged batch (horizon, history ends, time decay, utility by feedback), and the loss of
``ArgusModel`` on padded and packed rows as a per-pair loop over the encoder's states."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_heads import ref_loss_value

from embeddings.tables import ItemEmbeddings
from trainer.data.schema import PLAYED_NA, EventType
from trainer.model.argus import ArgusModel, HeadsConfig, ModelConfig, target_index
from trainer.model.heads import NextItemLossConfig, Utility, prediction_pairs
from trainer.model.interaction import side_table_rows

UTILITY = Utility(like=3.0, full=1.0, partial=0.5, skip=0.0, dislike=0.25, other=0.75, full_at=80)


def _batch(seed: int, lengths: list[int]) -> tuple[torch.Tensor, ...]:
    """lengths, timestamps (increasing within a sample), events, played percents (PLAYED_NA for some)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    ts = torch.cat([torch.cumsum(torch.randint(1, 20_000, (m,), generator=g), 0) for m in lengths])
    event = torch.randint(0, len(EventType), (n,), generator=g).to(torch.uint8)
    played = torch.randint(0, 130, (n,), generator=g).to(torch.int32)
    played[torch.rand(n, generator=g) < 0.2] = PLAYED_NA
    return torch.tensor(lengths), ts, event, played


def _utility(u: Utility, event: int, played: int) -> float:
    if event == EventType.LIKE:
        return u.like
    if event == EventType.SKIP:
        return u.skip
    if event == EventType.DISLIKE:
        return u.dislike
    if event == EventType.LISTEN:
        return u.full if played == PLAYED_NA or played >= u.full_at else u.partial
    return u.other


def _brute_pairs(lengths, ts, event, played, horizon, half_life, u) -> list[tuple[int, int, float]]:
    out, start = [], 0
    for m in lengths.tolist():
        for j in range(start + 1, start + m):  # every interaction but a sample's first is a target
            for i in range(j, min(j + horizon, start + m)):
                w = _utility(u, int(event[i]), int(played[i]))
                if half_life:
                    w *= 2.0 ** (-(int(ts[i]) - int(ts[j - 1])) / half_life)
                out.append((j, i, w))
        start += m
    return sorted(out, key=lambda p: (p[1] - p[0], p[0]))


@pytest.mark.parametrize("horizon,half_life", [(1, 0.0), (1, 3600.0), (3, 0.0), (4, 25_000.0), (9, 1e4)])
def test_pairs_and_weights_equal_brute_force(horizon, half_life):
    for seed, lengths in enumerate(([5, 1, 7, 2], [1, 1], [12], [3, 9, 1, 4, 6])):
        lengths, ts, event, played = _batch(seed, lengths)
        cfg = NextItemLossConfig(horizon=horizon, half_life_s=half_life, utility=UTILITY)
        j, i, w = prediction_pairs(lengths, target_index(lengths), ts, event, played, cfg)
        want = _brute_pairs(lengths, ts, event, played, horizon, half_life, UTILITY)
        assert list(zip(j.tolist(), i.tolist())) == [(a, b) for a, b, _ in want]
        assert w.tolist() == pytest.approx([c for _, _, c in want], rel=1e-6, abs=1e-12)
        assert w.dtype == torch.float32


def test_default_head_is_plain_next_item():
    assert not NextItemLossConfig().multi_token
    assert NextItemLossConfig(horizon=2).multi_token and NextItemLossConfig(half_life_s=1.0).multi_token
    assert NextItemLossConfig(utility=Utility(skip=0.0)).multi_token
    for bad, msg in (
        (dict(horizon=0), "heads.next_item.horizon: must be >= 1, got 0"),
        (dict(half_life_s=-1.0), "heads.next_item.half_life_s: must be >= 0 (0 = no decay), got -1.0"),
        (dict(utility=Utility(like=-1.0)), "heads.next_item.utility.like: must be >= 0, got -1.0"),
    ):
        with pytest.raises(ValueError) as e:
            NextItemLossConfig(**bad).validate("heads.next_item")
        assert str(e.value) == msg


@pytest.mark.parametrize("packed,layout", [(False, "merged"), (True, "merged"), (True, "interleaved")])
def test_model_loss_equals_a_per_pair_loop(packed, layout):
    """The next-item loss of ArgusModel.forward with pairs: each pair's user vector is the state after its context
    (j - 1), scored against the pair's target and the shared candidates; the weighted mean of those, computed
    here one pair at a time from the encoder's states (padding and history ends included)."""
    from trainer.data.layout import Packing, pack_stream

    g = torch.Generator().manual_seed(7)
    cfg_m = ModelConfig(preset="custom", d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=24, dropout=0.0,
                        token_layout=layout)  # fmt: skip
    ni = NextItemLossConfig(uniform_negatives=5, in_batch_negatives=4, temperature=0.2, horizon=3,
                            half_life_s=30_000.0, utility=UTILITY)  # fmt: skip
    model = ArgusModel(cfg_m, ItemEmbeddings.Config(item_dim=8), HeadsConfig(next_item=ni)).eval()
    lengths, ts, event, played = _batch(3, [6, 1, 4, 12, 2])
    n = int(lengths.sum())
    side = {k: torch.randint(0, r, (n,), generator=g) for k, r in side_table_rows(cfg_m.num_contexts).items()}
    item = torch.randn(n, 8, generator=g)
    neg = torch.randn(5, 8, generator=g)
    item_ids, neg_ids = torch.randint(0, 30, (n,), generator=g), torch.randint(0, 30, (5,), generator=g)
    tgt = target_index(lengths)
    sel = torch.randperm(tgt.numel(), generator=g)[:4]
    pairs = prediction_pairs(lengths, tgt, ts, event, played, ni)
    pos_lq = torch.randn(pairs[1].numel(), generator=g) * 0.1
    cand_lq = torch.randn(9, generator=g) * 0.1
    pack = None
    if packed:
        take, _, row, col = pack_stream(lengths.numpy(), Packing(rows=4, row_len=12, window=lengths.numel()))
        rows, cols = torch.empty(5, dtype=torch.int64), torch.empty(5, dtype=torch.int64)
        rows[take], cols[take] = torch.from_numpy(row), torch.from_numpy(col)
        pack = (rows, cols, (4, 12))
    args = (item, side, neg, lengths, tgt, sel, item_ids, neg_ids, event.long(), played.long(), pos_lq, cand_lq)
    got = model(*args, pack, pairs)["loss/next_item"]

    h = model.states(item, side, lengths, pack)
    cand = torch.cat([item[tgt][sel], neg]).double()
    cand_ids = torch.cat([item_ids[tgt][sel], neg_ids])
    total, weight = 0.0, 0.0
    for p, (j, i, w) in enumerate(zip(*pairs)):
        row = j - 1 if layout == "merged" else 2 * (j - 1) + 1  # interleaved: the feedback token of j - 1
        user = model.proj(h[row : row + 1]).double()
        ce = ref_loss_value(user, item[i : i + 1].double(), item_ids[i : i + 1], cand, cand_ids, pos_lq[p : p + 1],
                            cand_lq, ni)  # fmt: skip
        total, weight = total + float(w) * ce, weight + float(w)
    assert weight > 0 and math.isfinite(total)
    assert got.item() == pytest.approx(total / weight, rel=1e-5)
    # no pairs: each target's next item, weighted alike, which is what horizon 1 with a flat utility gives
    plain = model(*args[:10], pos_lq[: tgt.numel()], cand_lq, pack)["loss/next_item"]
    flat = NextItemLossConfig(uniform_negatives=5, in_batch_negatives=4, temperature=0.2)
    ones = prediction_pairs(lengths, tgt, ts, event, played, flat)
    assert torch.equal(ones[0], tgt) and torch.equal(ones[1], tgt) and bool((ones[2] == 1).all())
    same = model(*args[:10], pos_lq[: tgt.numel()], cand_lq, pack, ones)["loss/next_item"]
    assert same.item() == pytest.approx(plain.item(), rel=1e-6) and plain.item() != pytest.approx(got.item())


def test_context_before_equals_a_loop():
    from trainer.data.batch import Batch
    from trainer.evaluate import context_before

    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([6, 3, 9, 1, 4])
    t0 = 1_704_067_200  # real epoch seconds: float32 cannot tell them apart to the second
    ts = t0 + torch.cat([torch.cumsum(torch.randint(1, 10, (m,), generator=g), 0) for m in lengths.tolist()])
    starts = torch.tensor([3, 0, 5, 1, 4])  # target_start per sample (0: no context)
    values = {"timestamp": ts}
    batch = Batch(keys=[""] * 5, users=torch.arange(5), offsets=torch.zeros(5, dtype=torch.long), lengths=lengths,
                  target_start=starts, values=values, padded=False)  # fmt: skip
    for time in (t0 + x for x in (0, 5, 12, 13, 30, 1000)):
        want, off = [], 0
        for m, s in zip(lengths.tolist(), starts.tolist()):
            last = -1
            for p in range(s):  # context positions only
                if int(ts[off + p]) <= time:
                    last = p
            want.append(last)
            off += m
        assert context_before(batch, float(time)).tolist() == want, time


def test_holdout_start_reads_both_manifest_forms(data):
    from trainer.data.manifest import Manifest

    m = Manifest.load(data)  # leave-one-out
    assert m.holdout_start("test") is None
    m.source = {"holdout": "temporal", "val_start": 5, "test_start": 9}  # argus data synth
    assert (m.holdout_start("val"), m.holdout_start("test"), m.holdout_start("train")) == (5, 9, None)
    m.source = {"holdout": {"kind": "temporal", "val_start": 4, "test_start": 8}}  # argus data convert
    assert (m.holdout_start("val"), m.holdout_start("test")) == (4, 8)


@pytest.mark.slow
def test_multi_token_training_and_delayed_eval(tmp_path, data):
    """`argus train` with horizon 3, a half-life and a utility trains (its loss is the weighted pairs'), and
    `argus eval --delay` ranks the test window from older states: --delay 0 is the plain report, longer delays
    leave more users without a state, a huge one leaves none; a leave-one-out split is refused with one line."""
    from helpers import TINY_MODEL, argus_own_process, argus_ranks, one_line_error

    from trainer.data.synth import synthesize

    temporal = tmp_path / "temporal"
    synthesize(temporal, users=60, items=120, mean_len=40, shards=2, seed=4, holdout="temporal", workers=1, days=30,
               val_days=2, test_days=5)  # fmt: skip
    run = tmp_path / "run"
    argus_ranks("train", "configs/mini.yaml", f"data.path={temporal}", *TINY_MODEL, "data.num_workers=0",
                "train.steps=4", f"out={run}", "heads.next_item.horizon=3", "heads.next_item.half_life_s=86400",
                "heads.next_item.utility.skip=0", nproc=1)  # fmt: skip
    records = [r for x in (run / "metrics.jsonl").read_text().splitlines() if "loss/next_item" in (r := json.loads(x))]
    assert len(records) == 4 and all(math.isfinite(r["loss/next_item"]) for r in records)

    def report(*extra: str) -> dict:
        code, out, err = argus_own_process("eval", str(run), "--data", str(temporal), "--json", *extra)
        assert code == 0, err[-2000:]
        return json.loads(out)

    plain, zero, day, forever = report(), report("--delay", "0"), report("--delay", "2d"), report("--delay", "3650d")
    assert zero == {**plain, "cost": zero["cost"]} and "delay_s" not in zero
    assert day["delay_s"] == 2 * 86400 and day["split"] == "test"
    assert plain["users_without_history"] <= day["users_without_history"]
    assert day["users"] + day["users_without_history"] == plain["users"] + plain["users_without_history"]
    assert forever["users"] == 0
    code, _, err = argus_own_process("eval", str(run), "--data", str(data), "--delay", "24h")
    assert code == 2 and one_line_error(err).startswith(f"argus: error: --delay: needs a temporal holdout, and {data}")


def test_projection_is_an_alias_of_item_dim(capsys, tmp_path):
    from trainer.config import ConfigError, load_config
    from trainer.job import JobConfig

    cfg = load_config(JobConfig, "configs/mini.yaml", ["out=/x", "heads.next_item.projection=48"], validate=False)
    assert cfg.embeddings.item_dim == 48 and "note" not in capsys.readouterr().err  # no deprecation note
    import yaml

    from trainer.config import from_dict

    path = tmp_path / "alias.yaml"  # the alias in the file, an override by either name: the override wins
    path.write_text(yaml.safe_dump({"out": "/x", "heads": {"next_item": {"projection": 48}}}))
    for override in ("heads.next_item.projection=64", "embeddings.item_dim=64"):
        assert load_config(JobConfig, path, [override], validate=False).embeddings.item_dim == 64

    with pytest.raises(ConfigError) as e:  # both names in one file
        from_dict(JobConfig, {"heads": {"next_item": {"projection": 48}}, "embeddings": {"item_dim": 32}})
    assert str(e.value) == (
        "heads.next_item.projection: an alias of embeddings.item_dim, which is set to something else (32 vs 48); "
        "keep only embeddings.item_dim"
    )


def test_the_planner_counts_the_heads_pairs():
    """Each interaction is predicted by `horizon` states: the head's FLOPs (and so the planner's step, the
    trainer's tflops) count it that many times; the encoder's do not change."""
    from trainer.config import load_config
    from trainer.flops import encoder_flops_per_interaction, flops_per_interaction, head_flops_per_token
    from trainer.job import JobConfig

    one, four = (
        load_config(JobConfig, "configs/mini.yaml", ["out=/x", f"heads.next_item.horizon={k}"], validate=False)
        for k in (1, 4)
    )
    assert encoder_flops_per_interaction(four) == encoder_flops_per_interaction(one)
    head = head_flops_per_token(one.embeddings.item_dim, 1 + 256 + 256)
    assert flops_per_interaction(four, 10**6) - flops_per_interaction(one, 10**6) == pytest.approx(3 * head)


def test_the_planner_counts_the_pairs_activations():
    from trainer.config import load_config
    from trainer.job import JobConfig
    from trainer.memory import activations

    one, four = (
        load_config(JobConfig, "configs/mini.yaml", ["out=/x", f"heads.next_item.horizon={k}"], validate=False)
        for k in (1, 4)
    )
    targets = one.rows_per_batch() * one.interactions_per_sample()
    extra = targets * 3 * (2 * one.embeddings.item_dim * 4 + (1 + 256 + 256) * 4 * 3)
    assert activations(four).other - activations(one).other == extra
    assert activations(four).layers == activations(one).layers
