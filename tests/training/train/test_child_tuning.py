"""Child-Tuning (training/train/child_tuning.py) on real megatron-core steps of the micro preset (4 layers, MLA, MoE,
MTP; the distributed optimizer; AdamW with weight decay 0.1 from the first step), in one process and under EP2, PP2
and TP2+SP:

- _F: after each step, the elements outside that step's mask are bit for bit what they were (value, exp_avg,
  exp_avg_sq), though a plain AdamW step would have moved them; the kept gradients are the unmasked ones / p_F; the
  draws keep a p_F share, fresh each step, and name the same elements under every layout.
- _D: the child network is the top p_D share of a Fisher estimate computed apart, with plain autograd, on the same
  batches; every layout finds the same one (a global threshold, each element counted once); nothing else moves.

megatron runs in its own processes, as probes of this file (its CPU shim patches process-global state).

TP2 runs the micro model without experts: under TP2 with expert-parallel 1 and expert-TP 1 (the layout
tests/support/layouts.py calls TP2+SP), megatron-core 0.16.1 treats the routed experts as ordinary parameters
(`allreduce` is set from the expert-parallel size alone), so their gradients are reduced over the dense data-parallel
group, which excludes the other TP rank: each TP rank's copy of an expert gets a partial gradient and the copies drift
apart (by 0.0125 after 3 plain steps here). That is a bug of that layout, not of Child-Tuning, and it would show here
as a different Fisher estimate of the experts.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

P_F, P_D, FISHER_BATCHES, STEPS = 0.3, 0.2, 2, 3
DENSE = "model.num_experts=null"
LAYOUTS = {"EP2": [], "PP2": [], "TP2+SP": [DENSE]}   # tests/support/layouts.py's, plus these overrides


# ----------------------------------------------------------------------------------------------- the probe --
def _probe(out: Path, overrides: list[str]) -> None:
    """One layout's run (the process group may hold more: `__main__` below runs each layout in turn and shuts
    down)."""
    import torch.distributed as dist
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from training import checkpoint
    from training.config import resolve_stage_config
    from training.config.child_tuning import ChildTuningConfig
    from training.parallel.setup import init_distributed
    from training.train.child_tuning import ChildNetwork, element_facts, fisher_information
    from training.train.gpt_module import GPTTrainModule
    from training.train.losses import NextTokenLoss
    from training.train.trainer import InitialWeights

    cfg = resolve_stage_config("pretrain", "micro", overrides=[
        "model.num_layers=4", f"train.steps={STEPS}", "optimizer.warmup_steps=0", "optimizer.weight_decay=0.1",
        *overrides])
    info = init_distributed(cfg.parallel, seed=cfg.seed)
    active, captured = [None], {}

    def state_of(opt, p):
        return {k: v.clone() for k, v in opt.state.get(p, {}).items()
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.is_floating_point()}

    def before(opt, args, kwargs):   # global hooks: before Child-Tuning's pre-hook, after its post-hook
        if active[0] is None or active[0].step is None:
            return
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    captured[id(p)] = {"grad": p.grad.clone(), "param": p.detach().clone(),
                                       "state": state_of(opt, p), "decay": group["lr"] * group["weight_decay"]}

    def after(opt, args, kwargs):
        if active[0] is None or active[0].step is None:
            return
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in captured:
                    captured[id(p)].update(grad_after=p.grad.clone(), param_after=p.detach().clone(),
                                           state_after=state_of(opt, p))

    # process-global: removed at the end, before the next layout's probe registers its own
    hooks = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]

    def build(mode: str):
        config = ChildTuningConfig(mode=mode, p_f=P_F, p_d=P_D, fisher_batches=FISHER_BATCHES)
        module = GPTTrainModule(cfg, info.device, dataset=lambda n: _Tokens(), loss=NextTokenLoss(),
                                child_tuning=config)
        module.start(0, 0)
        return module

    def train(module, mode: str) -> dict:
        """STEPS steps, each checked element by element; per-rank sums of what was seen."""
        child = active[0] = module.child_tuning
        seen = {"losses": [], "steps": []}
        for step in range(STEPS):
            captured.clear()
            seen["losses"].append(module.train_step()["lm_loss"])
            row = dict.fromkeys(("stepped", "left_out", "grad_mismatch", "left_out_changed", "kept_moved",
                                 "left_out_plain_adamw_would_move", "counted", "counted_kept", "kept_identity_sum",
                                 "kept_before_too"), 0)
            for slot in child.slots:
                seen_slot = captured.get(id(slot.inner))
                if seen_slot is None:
                    continue
                kept = child.kept(slot, step)
                left_out = ~kept
                grad = seen_slot["grad"] / P_F if mode == "task_free" else seen_slot["grad"]
                row["grad_mismatch"] += int((seen_slot["grad_after"] != torch.where(kept, grad, 0.0)).sum())
                moved = seen_slot["param_after"] != seen_slot["param"]
                changed = moved.clone()
                for name, value in seen_slot["state_after"].items():
                    changed |= value != seen_slot["state"].get(name, torch.zeros_like(value))
                would_move = (seen_slot["state"].get("exp_avg", torch.zeros_like(moved, dtype=torch.float32)) != 0)
                would_move |= (seen_slot["param"] != 0) & (seen_slot["decay"] > 0)
                row["stepped"] += kept.numel()
                row["left_out"] += int(left_out.sum())
                row["left_out_changed"] += int((changed & left_out).sum())
                row["kept_moved"] += int((moved & kept).sum())
                row["left_out_plain_adamw_would_move"] += int((would_move & left_out).sum())
                if slot.counted:
                    row["counted"] += kept.numel()
                    row["counted_kept"] += int(kept.sum())
                    if mode == "task_free":   # which elements were kept, named layout-invariantly
                        row["kept_identity_sum"] += int((slot.identity.long() & 0xFFFFFFFF)[kept].sum())
                        if step:
                            row["kept_before_too"] += int((kept & child.kept(slot, step - 1)).sum())
            seen["steps"].append(row)
        active[0] = None
        return seen

    report = {"rank": info.rank}
    free = build("task_free")
    report["f"] = train(free, "task_free")
    report["f"]["identity_sum"] = sum(int((s.identity.long() & 0xFFFFFFFF).sum())
                                      for s in free.child_tuning.slots if s.counted)

    driven = build("task_driven")
    try:
        with driven.child_tuning.masking(0):
            pass
        report["d_without_child"] = "stepped"
    except RuntimeError as refused:
        report["d_without_child"] = str(refused)
    child = driven.child_tuning
    fisher = fisher_information(driven, child.slots, FISHER_BATCHES)
    report["d_select"] = child.fix_child_network(fisher)
    identities, _ = element_facts(driven.chunks)
    counted = [(i, s) for i, s in enumerate(child.slots) if s.counted]
    saved = {"identity": torch.cat([identities[id(s.model_param)][s.start:s.end] for _, s in counted]),
             "fisher": torch.cat([fisher[i].view(-1) for i, _ in counted]),
             "child": torch.cat([s.child.view(-1) for _, s in counted])}
    chosen = [s.child.clone() for s in child.slots]
    report["d"] = train(driven, "task_driven")

    if info.world_size == 1:   # the same batches, apart from megatron's schedule, DDP and the optimizer's shards
        fresh = build("off")   # the same initial weights (layout-invariant init from the seed)
        plain = _autograd_fisher(fresh, cfg.train)
        saved["fisher_autograd"] = torch.cat([plain[s.name].view(-1)[s.start:s.end] for _, s in counted])
        # A resumed run estimates its child network again on the weights it started from: the same one.
        release = checkpoint.save_release(out / "release", fresh.model, cfg.model)
        state = [*driven.chunks[0].parameters(), *driven.chunks[0].buffers()]   # the expert bias moved too
        trained = [t.detach().clone() for t in state]
        trainer = _Trainer(driven, step=STEPS, init_weights=InitialWeights("start", lambda: release))
        ChildNetwork().pre_train(trainer)
        report["resume"] = {
            "same_child": all(torch.equal(a, s.child) for a, s in zip(chosen, child.slots)),
            "weights_back": all(torch.equal(a, t) for a, t in zip(trained, state)),
            "release_differs": not all(torch.equal(a, t) for a, t in zip(trained, fresh.chunks[0].parameters()))}
        try:
            ChildNetwork().pre_train(_Trainer(driven, step=STEPS, init_weights=None))
            report["resume"]["without_init_weights"] = "resumed"
        except RuntimeError as refused:
            report["resume"]["without_init_weights"] = str(refused)
    torch.save(saved, out / f"d-rank{info.rank}.pt")
    reports = [None] * info.world_size
    dist.all_gather_object(reports, report)
    if info.is_main:
        print(json.dumps(reports), flush=True)
    for hook in hooks:
        hook.remove()


class _Tokens:
    """Random 33-token samples over the micro vocabulary, the loss on all but the first 8 positions (as SFT masks a
    prompt)."""

    def __len__(self):
        return 1 << 20

    def __getitem__(self, i):
        tokens = torch.randint(0, 512, (33,), generator=torch.Generator().manual_seed(i))
        mask = torch.ones(32)
        mask[:8] = 0
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": mask, "position_ids": torch.arange(32)}


class _Trainer:
    """What the ChildNetwork callback reads of a Trainer."""

    def __init__(self, module, step: int, init_weights):
        self.module, self.step, self.init_weights, self.is_main, self.label = module, step, init_weights, True, "t"


def _autograd_fisher(module, train) -> dict[str, torch.Tensor]:
    """{parameter name: Σ over the first FISHER_BATCHES batches of (d batch loss / d param)^2}, by plain autograd on
    the GPT model: the batch loss is the step's (each micro-batch's masked token mean, over the micro-batches), with the
    MoE balance and MTP losses megatron's schedule adds through its loss scalers (1 / micro-batches)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    gpt, data = module.chunks[0], module.batches.dataset
    names, params = zip(*[(n, p) for n, p in gpt.named_parameters() if p.requires_grad])
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in zip(names, params)}
    micro = train.global_batch_size // train.micro_batch_size
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / micro)
    MTPLossAutoScaler.set_loss_scale(torch.ones(1) / micro)
    for b in range(FISHER_BATCHES):
        loss = 0.0
        for m in range(micro):
            first = b * train.global_batch_size + m * train.micro_batch_size
            samples = [data[first + i] for i in range(train.micro_batch_size)]
            batch = module.vocabulary.batch_to_rows({k: torch.stack([s[k] for s in samples]) for k in samples[0]})
            mask = batch["loss_mask"].float()
            per_token = gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=mask)
            loss = loss + (per_token.float() * mask).sum() / mask.sum() / micro
        for name, grad in zip(names, torch.autograd.grad(loss, params, allow_unused=True)):
            if grad is not None:
                fisher[name] += grad.float().square()
    return fisher


NEXT = "next-layout"   # `probe OUT OVERRIDES... [next-layout OUT OVERRIDES...]`: layouts in turn, one launch

if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    runs = [[]]
    for arg in sys.argv[2:]:
        if arg == NEXT:
            runs.append([])
        else:
            runs[-1].append(arg)
    for out, *layout_overrides in runs:
        _probe(Path(out), layout_overrides)
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()   # the next layout makes its own groups on the same processes
    from training.parallel.setup import shutdown

    shutdown()
    sys.exit(0)


# ----------------------------------------------------------------------------------------------- the tests --
def _run(out: Path, *overrides: str) -> list[dict]:
    """The probe's reports in one process."""
    from tests.support.processes import run_python

    out.mkdir(parents=True, exist_ok=True)
    proc = run_python(__file__, "probe", str(out), *overrides, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("[")][-1])


def _run_layouts(outs: dict[str, Path]) -> dict[str, list[dict]]:
    """{layout: its reports}: the layouts (of one process count) in one torchrun launch, in turn on the same
    processes, each with its LAYOUTS overrides and its own output folder."""
    from tests.support.layouts import LAYOUTS as LAYOUT_OVERRIDES
    from tests.support.processes import REPO, repo_env, torchrun

    (nproc,) = {LAYOUT_OVERRIDES[layout][0] for layout in outs}
    argv = []
    for layout, out in outs.items():
        out.mkdir(parents=True, exist_ok=True)
        argv += [NEXT] if argv else []
        argv += [str(out), *LAYOUT_OVERRIDES[layout][1], *LAYOUTS[layout]]
    proc = subprocess.run([sys.executable, "-W", "ignore", *torchrun(nproc), __file__, "probe", *argv],
                          capture_output=True, text=True, timeout=300 * len(outs), cwd=REPO, env=repo_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(printed) == len(outs), proc.stdout[-3000:]
    return dict(zip(outs, printed))


def _saved(out: Path, ranks: int) -> dict[str, torch.Tensor]:
    parts = [torch.load(out / f"d-rank{r}.pt") for r in range(ranks)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """The probe in one process, once per module for each set of model overrides: (reports, saved _D tensors)."""
    runs = {}

    def get(*overrides: str):
        if overrides not in runs:
            out = tmp_path_factory.mktemp("child-tuning-1")
            runs[overrides] = _run(out, *overrides), _saved(out, 1)
        return runs[overrides]

    return get


@pytest.fixture(scope="module")
def one_process(one_process_runs):
    return one_process_runs()


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """{layout: (reports, saved _D tensors)}, filled on demand: the layouts of one model (the same overrides) and one
    process count (EP2 and PP2) in one torchrun launch, each in turn on the same processes."""
    from tests.support.layouts import LAYOUTS as LAYOUT_OVERRIDES

    runs = {}

    def get(name: str):
        if name not in runs:
            together = [n for n in LAYOUTS if LAYOUTS[n] == LAYOUTS[name]
                        and LAYOUT_OVERRIDES[n][0] == LAYOUT_OVERRIDES[name][0]]
            outs = {n: tmp_path_factory.mktemp("child-tuning-" + n.replace("+", "_")) for n in together}
            for n, reports in _run_layouts(outs).items():
                runs[n] = reports, _saved(outs[n], len(reports))
        return runs[name]

    return get


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, layout_runs, one_process_runs):
    """(name, reports, saved _D tensors) of the probe under a layout, and the one-process run of the same model."""
    reports, saved = layout_runs(request.param)
    return request.param, reports, saved, one_process_runs(*LAYOUTS[request.param])


def _summed(reports: list[dict], mode: str) -> list[dict]:
    return [{key: sum(r[mode]["steps"][s][key] for r in reports) for key in reports[0][mode]["steps"][s]}
            for s in range(STEPS)]


def _assert_left_out_unchanged(steps: list[dict], mode: str) -> None:
    for s, row in enumerate(steps):
        assert row["grad_mismatch"] == 0, (s, row)       # kept: unmasked / p_F (_F) or as is (_D); left out: 0
        assert row["left_out_changed"] == 0, (s, row)    # value, exp_avg, exp_avg_sq: bit for bit
        assert row["left_out"] > 0.5 * row["stepped"], (s, row)
        # ... though a plain AdamW step would have moved most of them (weight decay, and from step 2 on, _F's
        # momentum from the steps that kept them)
        assert row["left_out_plain_adamw_would_move"] > 0.9 * row["left_out"], (s, row)
        assert row["kept_moved"] > 0.9 * (row["stepped"] - row["left_out"]), (s, row)
    if mode == "task_free":
        for s, row in enumerate(steps):
            share = row["counted_kept"] / row["counted"]
            assert abs(share - P_F) < 0.005, (s, share)   # ~600k draws: the std of the share is 0.0006
            if s:   # fresh draws each step: kept twice in a row as often as independence says
                assert abs(row["kept_before_too"] / row["counted"] - P_F ** 2) < 0.005, (s, row)


def test_task_free_leaves_the_rest_untouched_and_scales_the_kept_gradients(one_process):
    reports, _ = one_process
    _assert_left_out_unchanged(_summed(reports, "f"), "task_free")
    losses = reports[0]["f"]["losses"]
    assert len(set(losses)) == STEPS   # it trains


def test_task_driven_child_is_the_top_share_of_an_independent_fisher_estimate(one_process):
    reports, saved = one_process
    ours, plain, child = saved["fisher"], saved["fisher_autograd"], saved["child"]
    expected, threshold = _top_share(plain)
    assert torch.isclose(ours, plain, rtol=1e-3, atol=1e-3 * float(threshold)).all()
    assert torch.equal(child, _top_share(ours)[0])   # exactly the top share of the module's own estimate ...
    _assert_same_child(child, ours, _top_share(ours)[1], expected, plain, threshold)   # ... and of the other one
    selected = reports[0]["d_select"]
    assert selected["elements"] == plain.numel() and selected["child"] == int(child.sum())
    assert selected["child"] == math.ceil(P_D * plain.numel())   # no ties at the threshold here
    _assert_left_out_unchanged(_summed(reports, "d"), "task_driven")
    assert all(row["left_out"] == plain.numel() - selected["child"] for row in _summed(reports, "d"))


def _top_share(fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's child network over a whole model's Fisher values: those at least the k-th largest, k = ceil(p_D x
    elements) (ties kept, zeros never); and that threshold."""
    threshold = torch.topk(fisher, math.ceil(P_D * fisher.numel())).values[-1]
    return (fisher >= threshold) & (fisher > 0), threshold


def _assert_same_child(child, fisher, threshold, other_child, other_fisher, other_threshold) -> None:
    """Two estimates of one model's Fisher information, summed in different orders: their child networks differ
    only in elements whose two estimates lie on different sides of the two thresholds, and in few."""
    differ = child != other_child
    gap = (fisher - other_fisher).abs() + (threshold - other_threshold).abs()
    explained = (other_fisher - other_threshold).abs() <= gap
    assert bool(explained[differ].all()), int((differ & ~explained).sum())
    assert int(differ.sum()) <= 1e-4 * child.numel(), int(differ.sum())


def test_task_driven_needs_its_child_network_and_finds_it_again_on_resume(one_process):
    reports, _ = one_process
    assert "no child network yet" in reports[0]["d_without_child"]
    resume = reports[0]["resume"]
    assert resume["same_child"] and resume["weights_back"] and resume["release_differs"]
    assert "without initial weights" in resume["without_init_weights"]


@pytest.mark.slow
def test_layouts_keep_the_guarantees_and_draw_the_same_elements(layout):
    name, reports, saved, (reference, reference_saved) = layout
    for mode in ("f", "d"):
        _assert_left_out_unchanged(_summed(reports, mode), "task_free" if mode == "f" else "task_driven")
        # the same model trained the same way: the losses of one process, within summation order (which can also
        # swap a _D child element within 1e-3 of the threshold for one outside it: 2 of 242k under TP2)
        losses, expected = reports[0][mode]["losses"], reference[0][mode]["losses"]
        tolerance = 1e-5 if mode == "f" else 1e-4
        assert max(abs(a - b) for a, b in zip(losses, expected)) < tolerance, (name, mode, losses, expected)
    # _F: every element counted once, named the same, drawn the same
    assert sum(r["f"]["identity_sum"] for r in reports) == reference[0]["f"]["identity_sum"]
    ours, theirs = _summed(reports, "f"), _summed(reference, "f")
    assert [r["counted"] for r in ours] == [r["counted"] for r in theirs]
    assert [r["kept_identity_sum"] for r in ours] == [r["kept_identity_sum"] for r in theirs]
    assert [r["counted_kept"] for r in ours] == [r["counted_kept"] for r in theirs]
    # _D: one global threshold (the exact top share of every rank's values together, each element once), and the
    # same elements, Fisher values and child network as one process
    child, fisher, threshold = saved["child"], saved["fisher"], _top_share(saved["fisher"])[1]
    assert torch.equal(child, _top_share(fisher)[0])
    assert reports[0]["d_select"]["child"] == int(child.sum())
    assert reports[0]["d_select"]["elements"] == reference[0]["d_select"]["elements"] == fisher.numel()
    assert torch.equal(saved["identity"].sort().values, reference_saved["identity"].sort().values)
    here, there = _same_elements(saved["identity"], reference_saved["identity"])
    other_fisher, other_threshold = reference_saved["fisher"], _top_share(reference_saved["fisher"])[1]
    # TP2 sums every matmul's partial products in another order: most estimates agree to 1e-5, a few (embedding
    # rows that nearly cancel) by a few percent
    close = torch.isclose(fisher[here], other_fisher[there], rtol=1e-2, atol=1e-3 * float(other_threshold))
    assert int((~close).sum()) <= 1e-4 * here.numel(), int((~close).sum())
    _assert_same_child(child[here], fisher[here], threshold, reference_saved["child"][there], other_fisher[there],
                       other_threshold)


def _same_elements(identity: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in `identity` and in `reference` of the same elements: those whose identity names one element only
    (32-bit hashes of ~600k elements collide a few dozen times)."""
    values, counts = reference.unique(return_counts=True)
    once = values[counts == 1]
    order, ref_order = identity.argsort(), reference.argsort()
    mine = order[torch.isin(identity[order], once)]
    theirs = ref_order[torch.isin(reference[ref_order], once)]
    return mine, theirs


def test_config_bounds_name_the_field():
    from pydantic import ValidationError

    from training.config.child_tuning import ChildTuningConfig

    assert ChildTuningConfig().mode == "off"
    assert (ChildTuningConfig().p_f, ChildTuningConfig().p_d) == (0.3, 0.3)
    for field, value in (("p_f", 0.0), ("p_d", 1.5), ("fisher_batches", 0), ("mode", "F")):
        with pytest.raises(ValidationError, match=field):
            ChildTuningConfig(**{field: value})
