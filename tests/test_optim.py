"""The dense optimizer's schedule and weight-decay groups against hand-computed values; `full_softmax: auto`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.model.heads import FULL_SOFTMAX_MULTIPLE, NextItemHead
from trainer.optim import OptimConfig, decay_groups, lr_multiplier


def lrs(cfg: OptimConfig, total: int, steps: int) -> list[float]:
    """The lr of optimizer steps 1..steps, through torch's LambdaLR as the engine uses it."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg, total))
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_hand_computed() -> None:
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=2, schedule="cosine")
    got = lrs(cfg, total=6, steps=8)
    # warmup: 1/2, 2/2; then cosine over the 4 remaining steps: t = 1/4, 2/4, 3/4, 4/4; then stays at min_lr
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)) for t in (0.25, 0.5, 0.75, 1.0)]
    want = [0.5, 1.0, *cos, 0.1, 0.1]
    assert got == pytest.approx(want, abs=1e-12)
    assert want[2] == pytest.approx(0.1 + 0.9 * (2 + math.sqrt(2)) / 4)  # the formula spelled out once


def test_min_lr_above_lr_is_the_lr() -> None:
    assert lrs(OptimConfig(lr=1e-6, min_lr=1e-5, schedule="cosine"), total=3, steps=3) == pytest.approx([1e-6] * 3)


def test_linear_and_constant() -> None:
    lin = lrs(OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=0, schedule="linear"), total=4, steps=4)
    assert lin == pytest.approx([1.5, 1.0, 0.5, 0.0])
    const = lrs(OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=3, schedule="constant"), total=4, steps=5)
    assert const == pytest.approx([2 / 3, 4 / 3, 2.0, 2.0, 2.0])


def test_optim_config_errors_name_the_key() -> None:
    for kw, key in [
        (dict(schedule="step"), "optim.schedule"),
        (dict(min_lr=-1.0), "optim.min_lr"),
        (dict(warmup_steps=-1), "optim.warmup_steps"),
        (dict(betas=[0.9]), "optim.betas"),
    ]:
        with pytest.raises(ValueError, match=key):
            OptimConfig(**kw).validate()


def test_decay_groups_on_the_argus_model() -> None:
    from embeddings.tables import ItemEmbeddings
    from trainer.model.argus import ArgusModel, HeadsConfig, ModelConfig

    model = ArgusModel(ModelConfig(preset="nano", max_seq_len=16), ItemEmbeddings.Config(item_dim=8), HeadsConfig())
    decay, no_decay = decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    got_decay = {names[id(p)] for p in decay["params"]}
    got_plain = {names[id(p)] for p in no_decay["params"]}
    # independently: 2-D weights of Linear layers decay; the rest never does
    want_decay = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    assert got_decay == want_decay
    assert got_decay.isdisjoint(got_plain) and got_decay | got_plain == set(names.values())
    for n in got_plain:
        assert n.endswith("bias") or ".ln" in n or "norm" in n or n.startswith(("encoder.pos", "interaction.side")), n
    assert "encoder.pos.weight" in got_plain and "interaction.side.event.weight" in got_plain
    assert "encoder.blocks.0.ln1.weight" in got_plain and "encoder.blocks.0.ff1.bias" in got_plain


@pytest.mark.parametrize("uniform,in_batch", [(256, 256), (100, 0), (0, 64)])
def test_full_softmax_auto_picks_each_side_of_the_threshold(uniform: int, in_batch: int) -> None:
    cfg = NextItemHead.Config(uniform_negatives=uniform, in_batch_negatives=in_batch)
    assert cfg.full_softmax == "auto"
    edge = FULL_SOFTMAX_MULTIPLE * (uniform + in_batch)
    assert cfg.full(edge) and cfg.full(1)
    assert not cfg.full(edge + 1)
    assert not cfg.full(None)  # catalog unknown (planning a large run): sampled
    assert NextItemHead.Config(full_softmax=True).full(10**9)
    assert not NextItemHead.Config(full_softmax=False).full(10)
    with pytest.raises(ValueError, match="full_softmax"):
        NextItemHead.Config(full_softmax="yes").validate()


def test_epochs_and_every_epochs_become_steps() -> None:
    from trainer.job import JobConfig

    cfg = JobConfig()
    assert cfg.total_steps(7) == cfg.train.steps and cfg.eval_every(7) == 0
    cfg.train.epochs, cfg.eval.every_epochs = 2.5, 1
    assert cfg.total_steps(8) == 20 and cfg.eval_every(8) == 8
    cfg.train.epochs = 0.01
    assert cfg.total_steps(8) == 1, "at least one step"


def test_eval_section_errors_name_the_key() -> None:
    from trainer.job import EvalSection

    for kw, key in [
        (dict(select="auc"), "eval.select"),
        (dict(select="ndcg@5"), "eval.select"),  # 5 is not in eval.ks
        (dict(every=2, every_epochs=1), "eval.every"),
        (dict(patience=3), "eval.patience"),
        (dict(every=-1), "eval.every"),
    ]:
        with pytest.raises(ValueError, match=key):
            EvalSection(**kw).validate()
    EvalSection(every=5, patience=2, select="hr@100").validate()


def test_recommendation_by_dataset_size() -> None:
    from trainer.recommend import TIERS, recommend

    assert recommend(100_000).preset == "nano" and recommend(100_000).config == "configs/nano.yaml"
    assert [recommend(int(limit)).preset for limit, *_ in TIERS[:-1]] == [t[1] for t in TIERS[:-1]]
    assert recommend(int(TIERS[0][0]) + 1).preset == "mini"
    assert recommend(10**12).preset == "large"
    for _, _, config, _ in TIERS:
        assert (Path(__file__).resolve().parents[1] / config).is_file(), config
