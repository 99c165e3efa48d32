"""All or nothing: every load checks everything it will apply before it changes anything.

For each load path a valid state is corrupted in one or more of the ways that make the load
refuse it (Hypothesis picks which part and how); the load must raise ``MiraiError`` and leave
every parameter, buffer, optimizer entry, step counter, replay cache and RNG state as it was,
bit for bit. The uncorrupted state still loads and round-trips exactly.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mirai_plugin import ForesightConfig, ForesightHead, MiraiError
from mirai_plugin.image import EMASource, ImageForesightConfig, TokenForesightHead

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from official_reference import group, load  # (the official trainer's tensors, tests/data)

EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONFIG = ForesightConfig(num_heads=2, segment_frames=1, predictor_depth=1, replay_max_pairs=1)
IMAGE_CONFIG = ImageForesightConfig(source="ema", projector_dim=8)


# ------------------------------------------------------------------ snapshots


def clone(value):
    """A deep copy whose tensors own their storage (a load writing in place cannot reach it)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: clone(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone(item) for item in value)
    return copy.deepcopy(value)


def same(a, b) -> bool:
    """Bit for bit: equal structure, dtypes, shapes and values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # torch's loader turns betas into a list
        return len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def video_snapshot(head: ForesightHead) -> dict:
    cache = head.replay_cache
    return clone({
        "weights": head.state_dict(),
        "optimizer": head.optimizer.state_dict(),
        "steps_taken": head.steps_taken,
        "replay": [(b.hidden, b.target, b.valid, b.weight) for b in cache.batches],
        "replay_closed": cache.closed,
        "replay_rng": cache.rng().get_state(),
    })


def image_snapshot(head: TokenForesightHead) -> dict:
    return clone({"weights": head.state_dict(), "optimizer": head.optimizer.state_dict(),
                  "steps_taken": head.steps_taken})


# ------------------------------------------------------------------ heads that trained


def trained_video_head(seed: int, config: ForesightConfig = CONFIG, dims: tuple[int, int] = (16, 24)):
    """Two steps with replay (the replay RNG moves), then a forward: pairs in the replay cache."""
    torch.manual_seed(seed)
    head = ForesightHead(config, *dims)

    def forward_backward():
        hidden = [torch.randn(1, 4, dims[0], requires_grad=True) for _ in range(3)]  # 3 x (b n d)
        head(hidden, torch.randn(1, 12, dims[1])).backward()

    for _ in range(2):
        forward_backward()
        head.step()
        head.replay()
    forward_backward()
    assert head.replay_pairs > 0 and head.optimization.stepped and head.steps_taken == 2
    return head


def trained_image_head(seed: int, config: ImageForesightConfig = IMAGE_CONFIG, width: int = 8):
    torch.manual_seed(seed)
    head = TokenForesightHead(config, width, width, (4, 4))
    for _ in range(2):
        head(torch.randn(2, 16, width), torch.randn(2, 16, width)).backward()
        head.step()
    return head


# ------------------------------------------------------------------ ways to break a state
# Each takes a copy of a valid training state and Hypothesis's `data`, and returns a state the
# load must refuse. The optimizer's are shared by the video and the image head.


def _param(data, state):
    return data.draw(st.sampled_from(sorted(state["optimizer"]["state"])), label="parameter")


def weight_missing(state, data, _others):
    del state["head"][data.draw(st.sampled_from(sorted(state["head"])), label="weight")]
    return state


def weight_unexpected(state, _data, _others):
    state["head"]["predictor.extra.weight"] = torch.zeros(2, 2)
    return state


def weight_misshaped(state, data, _others):
    name = data.draw(st.sampled_from(sorted(state["head"])), label="weight")
    value = state["head"][name]
    state["head"][name] = torch.zeros(value.shape[0] + 1, *value.shape[1:])
    return state


def weight_of_another_kind(state, data, _others):
    name = data.draw(st.sampled_from(sorted(state["head"])), label="weight")
    dtype = data.draw(st.sampled_from([torch.int64, torch.bool, torch.complex64]), label="dtype")
    state["head"][name] = state["head"][name].to(dtype)
    return state


def weight_not_a_tensor(state, data, _others):
    name = data.draw(st.sampled_from(sorted(state["head"])), label="weight")
    value = data.draw(st.sampled_from(["list", "meta", "none"]), label="value")
    state["head"][name] = {"list": state["head"][name].tolist(), "none": None,
                           "meta": state["head"][name].to("meta")}[value]
    return state


def optimizer_of_another_head(state, data, others):
    state["optimizer"] = copy.deepcopy(data.draw(st.sampled_from(others), label="other head's optimizer"))
    return state


def optimizer_entry_misshaped(state, data, _others):
    entry = state["optimizer"]["state"][_param(data, state)]
    name = data.draw(st.sampled_from(["exp_avg", "exp_avg_sq"]), label="entry")
    entry[name] = torch.zeros(entry[name].shape[0] + 1, *entry[name].shape[1:])
    return state


def optimizer_entry_missing_or_foreign(state, data, _others):
    entry = state["optimizer"]["state"][_param(data, state)]
    if data.draw(st.booleans(), label="drop an entry (else add one)"):
        del entry[data.draw(st.sampled_from(sorted(entry)), label="entry")]
    else:
        entry["momentum_buffer"] = torch.zeros_like(entry["exp_avg"])
    return state


def optimizer_entry_not_float(state, data, _others):
    entry = state["optimizer"]["state"][_param(data, state)]
    name = data.draw(st.sampled_from(["exp_avg", "exp_avg_sq"]), label="entry")
    entry[name] = data.draw(st.sampled_from([entry[name].to(torch.int32), entry[name].tolist(), None]), label="as")
    return state


def optimizer_step_not_a_count(state, data, _others):
    entry = state["optimizer"]["state"][_param(data, state)]
    entry["step"] = data.draw(st.sampled_from([
        torch.tensor(-1.0), torch.tensor(1.5), torch.tensor(float("nan")), torch.tensor([1.0, 2.0]), "1", True,
    ]), label="step")
    return state


def optimizer_entry_of_an_unknown_parameter(state, data, _others):
    """Renamed, or dropped (torch would keep the live head's entry for it)."""
    entries = state["optimizer"]["state"]
    entry = entries.pop(_param(data, state))
    if data.draw(st.booleans(), label="rename (else drop)"):
        entries["predictor.nothing.weight"] = entry
    return state


def optimizer_groups_differ(state, data, _others):
    groups = state["optimizer"]["param_groups"]
    how = data.draw(st.sampled_from(["drop a name", "add a group", "drop a group", "repeat a name"]), label="how")
    if how == "drop a name":
        name = _param(data, state)
        for group in groups:
            if name in group["params"]:
                group["params"].remove(name)
    elif how == "add a group":
        groups.append({**groups[0], "params": []})
    elif how == "drop a group":
        groups.pop()
    else:
        groups[0]["params"].append(groups[0]["params"][0])
    return state


def optimizer_hyperparameter(state, data, _others):
    group = data.draw(st.sampled_from(state["optimizer"]["param_groups"]), label="group")
    key = data.draw(st.sampled_from(["lr", "eps", "weight_decay", "betas", "amsgrad"]), label="key")
    if key != "amsgrad" and data.draw(st.booleans(), label="delete"):
        del group[key]
    else:
        group[key] = {"lr": "1e-3", "eps": None, "weight_decay": [0.1], "betas": (0.9,), "amsgrad": "yes"}[key]
    return state


def optimizer_not_a_state(state, data, _others):
    state["optimizer"] = data.draw(st.sampled_from([[], "optimizer.pt", {"state": {}}, {"param_groups": []},
                                                    {"state": [], "param_groups": []}]), label="optimizer")
    return state


def optimizer_by_index_of_another_head(state, data, others):
    """``optimizer.state_dict()`` (keyed by index, as image states before 0.2.0) of a head of another size."""
    state["optimizer"] = copy.deepcopy(data.draw(st.sampled_from(others["by index"]), label="by index"))
    return state


def steps_taken_not_a_count(state, data, _others):
    state["steps_taken"] = data.draw(st.sampled_from([-1, 1.5, True, "3", None]), label="steps_taken")
    return state


SHARED = [weight_missing, weight_unexpected, weight_misshaped, weight_of_another_kind, weight_not_a_tensor,
          optimizer_entry_misshaped, optimizer_entry_missing_or_foreign, optimizer_entry_not_float,
          optimizer_step_not_a_count, optimizer_entry_of_an_unknown_parameter, optimizer_groups_differ,
          optimizer_hyperparameter, optimizer_not_a_state, steps_taken_not_a_count]


def replay_rng_not_a_state(state, data, _others):
    rng = VIDEO_STATE["replay_rng"]
    state["replay_rng"] = data.draw(st.sampled_from([
        rng.float(), rng[0], rng[:, :10], torch.zeros_like(rng), rng.to("meta"), rng[0].tolist(),
    ]), label="replay_rng")
    return state


def settings_of_another_head(state, data, _others):
    how = data.draw(st.sampled_from(["depth", "widths", "format", "config", "no weights"]), label="how")
    if how == "depth":
        state["config"] = {**state["config"], "predictor_depth": 2}
    elif how == "widths":
        state["student_dim"] = 32
    elif how == "format":
        state["format"] = "mirai_plugin.TokenForesightHead.training_state"
    elif how == "config":
        state["config"] = CONFIG.to_json()
    else:
        del state["head"]
    return state


VIDEO = [*SHARED, optimizer_of_another_head, optimizer_by_index_of_another_head, replay_rng_not_a_state,
         settings_of_another_head]
IMAGE = [*SHARED, optimizer_of_another_head, optimizer_by_index_of_another_head]


VIDEO_STATE = trained_video_head(0).training_state()
VIDEO_OTHERS = [trained_video_head(5, CONFIG.replace(predictor="mlp")),
                trained_video_head(6, CONFIG.replace(predictor_depth=2)), trained_video_head(7, CONFIG, (16, 32))]
VIDEO_OPTIMIZERS = {"another head": [h.training_state()["optimizer"] for h in VIDEO_OTHERS],
                    "by index": [h.optimizer.state_dict() for h in VIDEO_OTHERS]}
IMAGE_STATE = trained_image_head(0).training_state()
IMAGE_OTHERS = [trained_image_head(5, ImageForesightConfig(source="ema", projector_dim=8, neighbours=1)),
                trained_image_head(6, width=12), trained_image_head(7, IMAGE_CONFIG.replace(projector_dim=4))]
IMAGE_OPTIMIZERS = {"another head": [h.training_state()["optimizer"] for h in IMAGE_OTHERS],
                    "by index": [h.optimizer.state_dict() for h in IMAGE_OTHERS]}


def part(way) -> str:
    """The part of the state a way breaks: two ways of one example break different parts."""
    return way.__name__.split("_")[0]


def ways_to_break(ways: list) -> st.SearchStrategy:
    # The head's settings last: one of its ways drops the weights the others would break.
    return st.lists(st.sampled_from(ways), min_size=1, max_size=2, unique_by=part).map(
        lambda chosen: sorted(chosen, key=lambda way: way is settings_of_another_head))


def corrupt(state, ways, data, optimizers):
    state = clone(state)
    for way in ways:
        others = optimizers if way is optimizer_by_index_of_another_head else optimizers["another head"]
        state = way(state, data, others)
    return state


# ------------------------------------------------------------------ load_training_state (both heads)


def test_all_or_nothing_weights_that_fit_with_another_heads_optimizer_state_load_nothing():
    """The issue's case: the weights fit, the optimizer state is another head's (an MLP's, a deeper or a
    wider head's); loading it used to raise after the weights had loaded, or to load moments that do not fit."""
    for other in VIDEO_OTHERS:
        live = trained_video_head(1)
        before = video_snapshot(live)
        state = {**clone(VIDEO_STATE), "optimizer": other.training_state()["optimizer"]}
        with pytest.raises(MiraiError, match=r"training state's optimizer state does not fit this head's optimizer"):
            live.load_training_state(state)
        assert same(video_snapshot(live), before)


HEADS = {  # how to train a live head, what a load may change of it, its valid state, the ways to break it
    "video": (trained_video_head, video_snapshot, VIDEO_STATE, VIDEO, VIDEO_OPTIMIZERS),
    "image": (trained_image_head, image_snapshot, IMAGE_STATE, IMAGE, IMAGE_OPTIMIZERS),
}


@pytest.mark.parametrize("kind", sorted(HEADS))
@EXAMPLES
@given(data=st.data())
def test_all_or_nothing_training_state(kind, data):
    """``ForesightHead`` and ``TokenForesightHead.load_training_state``."""
    trained, snapshot, state, ways, optimizers = HEADS[kind]
    live = trained(1)
    before = snapshot(live)
    broken = corrupt(state, data.draw(ways_to_break(ways), label="ways"), data, optimizers)
    with pytest.raises(MiraiError):
        live.load_training_state(broken)
    assert same(snapshot(live), before)


def test_all_or_nothing_video_training_state_round_trips_exactly():
    live = trained_video_head(1)
    state = clone(VIDEO_STATE)
    live.load_training_state(state)
    assert same(state, VIDEO_STATE)  # the caller's dict is untouched
    again = live.training_state()
    assert same(again, VIDEO_STATE)
    assert live.replay_pairs == 0  # a resumed head starts a new replay cache


def test_all_or_nothing_image_training_state_round_trips_exactly():
    live = trained_image_head(1)
    before = image_snapshot(live)
    with pytest.raises(MiraiError, match="optimizer state does not fit this image head's optimizer"):
        live.load_training_state({**clone(IMAGE_STATE), "optimizer": IMAGE_OPTIMIZERS["another head"][0]})
    assert same(image_snapshot(live), before)
    live.load_training_state(clone(IMAGE_STATE))
    assert same(live.training_state(), IMAGE_STATE)


# ------------------------------------------------------------------ ForesightHead.load (safetensors)


def _file_corruptions(tensors: dict, metadata: dict, data) -> tuple[dict, dict]:
    tensors, metadata = dict(tensors), dict(metadata)
    how = data.draw(st.sampled_from(["missing", "unexpected", "misshaped", "integer", "depth", "widths"]), label="how")
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    if how == "missing":
        del tensors[name]
    elif how == "unexpected":
        tensors["predictor.extra.weight"] = torch.zeros(2)
    elif how == "misshaped":
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    elif how == "integer":
        tensors[name] = tensors[name].to(torch.int32)
    elif how == "depth":
        metadata["config"] = CONFIG.replace(predictor_depth=2).to_json()
    else:
        metadata["encoder_dim"] = "32"
    return tensors, metadata


@EXAMPLES
@given(data=st.data())
def test_all_or_nothing_head_file(tmp_path_factory, data):
    """A refused file builds no head: the global random state (which building one draws from) is untouched."""
    path = tmp_path_factory.mktemp("file") / "head.safetensors"
    head = trained_video_head(0)
    head.save(path)
    with safe_open(str(path), "pt") as file:
        tensors, metadata = {k: file.get_tensor(k) for k in file.keys()}, file.metadata()
    tensors, metadata = _file_corruptions(tensors, metadata, data)
    save_file(tensors, str(path), metadata=metadata)
    rng = torch.random.get_rng_state()
    with pytest.raises(MiraiError, match=str(path.name)):
        ForesightHead.load(path)
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_all_or_nothing_head_file_round_trips_exactly(tmp_path):
    head = trained_video_head(0)
    head.save(tmp_path / "head.safetensors")
    loaded = ForesightHead.load(tmp_path / "head.safetensors")
    assert same(loaded.state_dict(), head.state_dict()) and loaded.config == head.config


# ------------------------------------------------------------------ ForesightHead.load_official

OFFICIAL, META = load("official_mean")
PROJECTOR, DIM_PROJ = group(OFFICIAL, "projector."), group(OFFICIAL, "dim_proj.")


@EXAMPLES
@given(data=st.data())
def test_all_or_nothing_official_checkpoint(data):
    projector, dim_proj = dict(PROJECTOR), dict(DIM_PROJ)
    # (Without offset conditioning the official AdaLN weight never acts and is not loaded.)
    used = sorted(k for k in projector if k.startswith("blocks.") and "adaLN_modulation.1.weight" not in k)
    name = data.draw(st.sampled_from(used), label="tensor")
    how = data.draw(st.sampled_from(["missing", "misshaped", "integer", "dim_proj"]), label="how")
    if how == "missing":
        del projector[name]
    elif how == "misshaped":
        projector[name] = torch.zeros(projector[name].shape[0] + 1, *projector[name].shape[1:])
    elif how == "integer":
        projector[name] = projector[name].to(torch.int64)
    else:
        dim_proj["weight"] = dim_proj["weight"][:, :-1]
    rng = torch.random.get_rng_state()
    with pytest.raises(MiraiError):
        ForesightHead.load_official({"mirai_projector": projector, "foresight_dim_proj": dim_proj})
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_all_or_nothing_official_checkpoint_loads_its_tensors():
    head = ForesightHead.load_official({"mirai_projector": PROJECTOR, "foresight_dim_proj": DIM_PROJ})
    assert torch.equal(head.predictor.blocks[2].to_q.weight, PROJECTOR["blocks.2.q.weight"])
    assert torch.equal(head.project.weight, DIM_PROJ["weight"])


# ------------------------------------------------------------------ the trainer glues


def test_all_or_nothing_self_forcing_glue():
    from test_glue import ARGS, TinyDMD

    def trained(seed):
        dmd = TinyDMD(ARGS, seed=seed)
        dmd.generator_loss(seed)[0].backward()
        dmd.foresight.after_generator_step()
        return dmd

    saved = trained(0).foresight.checkpoint_state()
    deeper = TinyDMD({**ARGS, "projection_layers_num": 3}, seed=2)
    deeper.generator_loss()[0].backward()
    deeper.foresight.after_generator_step()
    # The official projector is 16 -> 24 wide; the trainer's head 32 -> 48.
    official = {"mirai_projector": {k: v for k, v in PROJECTOR.items() if k != "_num_heads_meta"},
                "foresight_dim_proj": DIM_PROJ}
    foreign = deeper.foresight.checkpoint_state()["foresight"]["optimizer"]
    refused = [
        {"foresight": {**saved["foresight"], "optimizer": foreign}},
        {"foresight": {**saved["foresight"], "steps_taken": -1}},
        {"foresight": [saved["foresight"]]},
        official,
    ]
    live = trained(1)
    before = video_snapshot(live.foresight.head)
    for checkpoint in refused:
        with pytest.raises(MiraiError):
            live.foresight.load_checkpoint_state(checkpoint, strict=True)
        assert same(video_snapshot(live.foresight.head), before)
    live.foresight.load_checkpoint_state(saved)
    assert same(live.foresight.checkpoint_state(), saved)


def test_all_or_nothing_self_forcing_glue_takes_official_weights():
    from test_glue import ARGS, TinyDMD
    from tiny_models import make_pair

    class Official(TinyDMD):  # a generator and encoder of the official reference's widths
        def __init__(self, args):
            torch.nn.Module.__init__(self)
            self.generator, self.real_score = make_pair(0, student_dim=16, encoder_dim=24)
            self.device, self.dtype = torch.device("cpu"), torch.float32
            from mirai_plugin.integrations.self_forcing import DMDForesight

            self.foresight = DMDForesight(self, args)

    dmd = Official({**ARGS, "projection_layers_num": 3})
    projector = {k: v for k, v in PROJECTOR.items() if k != "_num_heads_meta"}
    dmd.foresight.load_checkpoint_state({"mirai_projector": projector, "foresight_dim_proj": DIM_PROJ}, strict=True)
    head = dmd.foresight.head
    assert torch.equal(head.predictor.blocks[1].ffn_out.weight, PROJECTOR["blocks.1.ffn.2.weight"])
    assert torch.equal(head.project.weight, DIM_PROJ["weight"])


def test_all_or_nothing_llamagen_glue():
    """A Mirai-E checkpoint whose EMA source does not fit loads neither the heads nor the source."""
    from test_llamagen_glue import E, TinyLlamaGen, args_for, step

    from mirai_plugin.integrations.llamagen import LlamaGenMirai

    def trained(seed):
        torch.manual_seed(seed)
        model = TinyLlamaGen()
        mirai = LlamaGenMirai(model, args_for(*E), steps_per_epoch=4, device=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(2):
            step(mirai, model, optimizer, seed + i)
        return mirai

    def snapshot(mirai):
        return {"head": image_snapshot(mirai.head), "source": clone(mirai.source.state_dict())}

    saved = trained(0).checkpoint_state()
    entry = saved["foresight"]
    name = sorted(entry["source"])[0]
    refused = [
        {"foresight": {**entry, "source": {**entry["source"], name: entry["source"][name].to(torch.int64)}}},
        {"foresight": {**entry, "source": {k: v for k, v in entry["source"].items() if k != name}}},
        {"foresight": {"source": entry["source"]}},
        {"foresight": "head.pt"},
        {"foresight": {**entry, "head": {**entry["head"], "steps_taken": -1}}},
    ]
    live = trained(1)
    before = snapshot(live)
    for checkpoint in refused:
        with pytest.raises(MiraiError):
            live.load_checkpoint_state(checkpoint)
        assert same(snapshot(live), before)
    live.load_checkpoint_state(saved)
    assert same(live.checkpoint_state(), saved)


def test_all_or_nothing_ema_source():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    source = EMASource(model, 1, blocks="layers")
    before = clone(source.state_dict())
    bad = {**before, "layers.0.weight": before["layers.0.weight"].to(torch.int64)}
    with pytest.raises(
        MiraiError, match=r"wrong dtypes \['layers.0.weight: checkpoint torch.int64 vs head torch.float32"
    ):
        source.load_state_dict(bad)
    assert same(source.state_dict(), before)


# ------------------------------------------------------------------ several ranks


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("strategy", ["replicate", "fsdp2"])
def test_all_or_nothing_a_state_rank_0_refuses_loads_on_no_rank(strategy):
    import distributed_cases as cases

    cases.spawn(cases.refused_state, strategy)
