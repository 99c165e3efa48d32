"""What the foresight term is: one typed, validated configuration.

Defaults are the official Video-Mirai Stage-3 recipe (chunk-wise DMD on Wan 2.1):
student block 15 of 30, encoder block 20 of 40, offsets {0, 1} fused by mean,
a 3-block DiT predictor, negative-cosine loss with weight 0.2, and projector
replay on critic steps with its own AdamW (lr 2e-6, betas (0, 0.999)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from mirai_plugin.checks import Rule, check, normalise_betas, normalise_offsets, parse_device
from mirai_plugin.errors import MiraiError
from mirai_plugin.schedule import WeightSchedule, check_field_names, fields_from_json  # noqa: F401  (re-exported)

FUSIONS = ("mean", "none", "frame_mean")
PREDICTORS = ("dit", "mlp", "multi_mlp")
LOSSES = ("cosine", "mse")
COMPUTE_DTYPES = ("float32", "bfloat16")

_LAYER = "a 0-based block index >= 0"
# What each scalar field may be; the same rules check the upstream keys that feed them.
_RULES = {
    "weight": Rule("number", minimum=0, fix="use 0 to disable the foresight term"),
    "student_layer": Rule("int", minimum=0, what=_LAYER),
    "encoder_layer": Rule("int", minimum=0, what=_LAYER),
    "fusion": Rule("choice", choices=FUSIONS),
    "predictor": Rule("choice", choices=PREDICTORS),
    "predictor_depth": Rule("int", minimum=1, fix="the official recipe uses 3 DiT blocks"),
    "ffn_ratio": Rule("number", above=0, fix="the official recipe uses 4"),
    "num_heads": Rule("int", minimum=1, none=True, fix="None uses a head width of 128"),
    "offset_conditioning": Rule("bool"),
    "loss": Rule("choice", choices=LOSSES),
    "segment_frames": Rule("int", minimum=1, fix="3 chunk-wise, 1 frame-wise"),
    "lr": Rule("number", above=0, fix="the official recipe uses 2e-6"),
    "weight_decay": Rule("number", minimum=0),
    "max_grad_norm": Rule("number", above=0, none=True, fix="None disables clipping"),
    "replay": Rule("bool"),
    "replay_segments": Rule("int", minimum=1, none=True, fix="None takes as many as activation_budget_mib allows"),
    "replay_max_pairs": Rule("int", minimum=1, none=True, fix="None replays all of them"),
    "replay_seed": Rule("int", minimum=0, maximum=2**63 - 1),
    "check_finite": Rule("bool"),
    "activation_budget_mib": Rule("number", above=0, none=True,
                                  fix="a budget in MiB such as 1024 (the default), or None to keep every segment's "
                                      "activations (one pass)"),
    "compute_dtype": Rule("choice", choices=COMPUTE_DTYPES),
}


@dataclass(frozen=True, kw_only=True)
class ForesightConfig(WeightSchedule):
    """Settings of the foresight term. Every field is keyword-only.

    Args:
        weight: lambda, the factor on the foresight loss added to the generator loss.
            0 disables the term.
        student_layer: 0-based index of the generator block whose output is captured.
        encoder_layer: 0-based index of the frozen encoder block whose output is the target.
        offsets: segment offsets of the target window; segment k is paired with k+d.
        fusion: ``"mean"`` averages the encoder features of all valid offsets into one
            target (official Stage 3); ``"none"`` keeps one target and one loss per
            offset; ``"frame_mean"`` averages each target segment over its frames
            (Stage-2 per-frame averaging, see docs/design.md).
        predictor: ``"dit"``, ``"mlp"`` or ``"multi_mlp"`` (one MLP per offset).
        predictor_depth: number of DiT blocks.
        ffn_ratio: FFN width of the predictor as a multiple of the student width.
        num_heads: attention heads of the DiT predictor; ``None`` uses a head width of
            128 as Wan does (12 heads for the 1536-wide Wan-1.3B).
        offset_conditioning: condition the DiT's AdaLN on the offset (DiT-AdaLN,
            one prediction per offset; needs per-offset targets).
        loss: ``"cosine"`` (official negative cosine) or ``"mse"``.
        segment_frames: latent frames per segment (3 chunk-wise, 1 frame-wise).
        lr, betas, weight_decay: the predictor's own AdamW.
        max_grad_norm: clip norm for the predictor's gradients (the generator's, 10.0).
        replay: keep the last generator step's (hidden, target) pairs and update the
            predictor on them at critic steps (official ``projector_every_step``).
        replay_device: where replay pairs are kept (``"cpu"`` as upstream, or ``None``
            to keep them where they were computed).
        replay_segments: cached segments per replay backward; ``None`` (default) takes as
            many as ``activation_budget_mib`` allows, ``1`` runs one segment at a time as the
            official trainer does. The gradient is the same.
        replay_max_pairs: replay at most this many cached segments, drawn at random
            without replacement on each replay (official ``max_replay_pairs``); ``None``
            replays all of them.
        replay_seed: seed of the head's own replay-sampling generator (rank ``r`` uses
            ``replay_seed + r``); its state is part of ``ForesightHead.training_state()``.
        weight_start: generator step at which the term turns on (0 before it).
        weight_ramp: steps of a linear ramp from ``weight / weight_ramp`` up to the weight,
            starting at ``weight_start``.
        weight_changes: ``((step, weight), ...)``: from ``step`` on, the weight is ``weight``
            (Mirai's 2 -> 1 at half training: ``weight=2.0, weight_changes=((T // 2, 1.0),)``).
        weight_stop: generator step from which the term is off again (``None``: never).
        check_finite: raise, naming the segment (and the rank), when the loss is NaN/inf.
        activation_budget_mib: the most predictor activations (MiB, with the prediction
            and its gradient) kept for backward at once. Segments that fit go through the
            predictor in one pass; beyond it they go in groups recomputed in the backward,
            and a segment larger than the budget also recomputes each predictor block.
            Gradients and every use of the term (``autograd.grad``, ``backward(inputs=...)``,
            ``retain_graph``) are as in one pass, except a double backward
            (``create_graph=True``), which raises. ``None``: no bound (always one pass).
        compute_dtype: ``"float32"`` (default) or ``"bfloat16"``: the predictor computes
            under bfloat16 autocast over its float32 weights; the loss stays float32.

    Example:
        >>> from mirai_plugin import ForesightConfig
        >>> cfg = ForesightConfig()
        >>> cfg.offsets, cfg.fusion, cfg.weight
        ((0, 1), 'mean', 0.2)
        >>> ForesightConfig(offsets=[0, 1, 2]).offsets
        (0, 1, 2)
    """

    weight: float = 0.2
    student_layer: int = 15
    encoder_layer: int = 20
    offsets: tuple[int, ...] = (0, 1)
    fusion: str = "mean"
    predictor: str = "dit"
    predictor_depth: int = 3
    ffn_ratio: float = 4
    num_heads: int | None = None
    offset_conditioning: bool = False
    loss: str = "cosine"
    segment_frames: int = 3
    lr: float = 2e-6
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    max_grad_norm: float | None = 10.0
    replay: bool = True
    replay_device: str | None = "cpu"
    replay_segments: int | None = None
    replay_max_pairs: int | None = None
    replay_seed: int = 0
    weight_start: int = 0
    weight_ramp: int = 0
    weight_changes: tuple[tuple[int, float], ...] = ()
    weight_stop: int | None = None
    check_finite: bool = True
    activation_budget_mib: float | None = 1024
    compute_dtype: str = "float32"

    RULES: ClassVar[Mapping[str, Rule]] = _RULES

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # (frozen)
        for name, rule in _RULES.items():
            set_(name, check(name, getattr(self, name), rule))
        set_("offsets", normalise_offsets(self.offsets))
        set_("betas", normalise_betas(self.betas))
        set_("replay_device", parse_device("replay_device", self.replay_device, none=True))
        super().__post_init__()  # the schedule

        # Cross-field rules.
        per_offset = self.fusion != "mean"
        if self.predictor == "multi_mlp":
            _check(
                per_offset,
                "predictor='multi_mlp' has one head per offset and needs one target per offset: "
                "pass fusion='none' (or 'frame_mean'), or use predictor='mlp' with fusion='mean'",
            )
        if self.offset_conditioning:
            _check(
                self.predictor == "dit",
                f"offset_conditioning is an AdaLN input of the DiT predictor; pass predictor='dit' "
                f"(got {self.predictor!r}) or offset_conditioning=False",
            )
            _check(
                per_offset,
                "offset_conditioning predicts each offset separately and needs one target per offset: "
                "pass fusion='none' (or 'frame_mean'), or offset_conditioning=False",
            )

    @property
    def max_offset(self) -> int:
        return self.offsets[-1]

    def to_upstream(self) -> dict[str, Any]:
        """The trainer-config keys that ``from_upstream`` reads back into this config.

        Official keys where they exist (the window as ``foresight_delta`` /
        ``foresight_skip`` / ``foresight_include_current`` when it is one), this
        package's ``foresight_*`` keys for the rest. ``beta1``, ``beta2``,
        ``weight_decay``, ``num_frame_per_block`` and ``max_grad_norm_generator`` are
        the trainer's own keys: the official trainer shares them with the generator.
        The mapping lives in ``mirai_plugin.official.trainer_config``.

        >>> cfg = ForesightConfig(offsets=(0, 1, 2), fusion="none")
        >>> keys = cfg.to_upstream()
        >>> keys["foresight_delta"], keys["foresight_delta_mean_pool"]
        (2, False)
        >>> ForesightConfig.from_upstream(keys) == cfg
        True
        """
        return _trainer_config().upstream_keys(self)

    @classmethod
    def from_upstream(cls, args: Any) -> ForesightConfig:
        """Read the foresight keys of a trainer config: an argparse namespace, an OmegaConf
        config or a dict (the whole trainer config; its other keys pass untouched).

        Keys read (``mirai_plugin.keys`` lists them all): ``foresight_weight`` (absent
        means 0: the term is off, as in the official trainer),
        ``foresight_student_layer`` / ``foresight_teacher_layer`` (both from
        ``foresight_layer`` when neither is set), ``foresight_delta``,
        ``foresight_include_current``, ``foresight_skip`` (or ``foresight_offsets``),
        ``foresight_delta_mean_pool`` (or ``foresight_fusion``),
        ``foresight_projector_type``, ``projection_layers_num``,
        ``foresight_ffn_ratio``, ``foresight_loss_type``, ``lr_foresight`` (falling
        back to ``lr``), ``beta1``/``beta2``, ``weight_decay``,
        ``max_grad_norm_generator``, ``projector_every_step``, ``max_replay_pairs`` and
        ``num_frame_per_block``; and this package's ``foresight_num_heads``,
        ``foresight_replay_device`` / ``_segments`` / ``_seed``,
        ``foresight_check_finite``, ``foresight_activation_budget_mib`` (a number, or
        ``none``), ``foresight_compute_dtype`` and the schedule keys ``foresight_weight_start``,
        ``foresight_weight_ramp``, ``foresight_weight_changes`` (a list of
        ``[step, weight]``) and ``foresight_weight_stop``. Other keys absent from
        ``args`` keep the recipe defaults; ``null`` counts as absent.

        Values are read as YAML and command lines write them (``"false"``, ``"off"``
        and ``0`` are false; ``"2e-6"`` is a number); anything else raises, naming
        the key. So do keys that look like ours but are not known (a typo such as
        ``foresight_wieght``, with the closest known key) and official options this
        package does not implement.

        Example:
            >>> from argparse import Namespace
            >>> cfg = ForesightConfig.from_upstream(Namespace(
            ...     foresight_weight=0.2, foresight_student_layer=15, foresight_teacher_layer=20,
            ...     foresight_delta=1, foresight_include_current=True, foresight_delta_mean_pool=True,
            ...     foresight_projector_type="dit", projection_layers_num=3, foresight_ffn_ratio=4,
            ...     foresight_loss_type="cosine", lr_foresight=2e-6, projector_every_step=True))
            >>> cfg == ForesightConfig()
            True
        """
        return _trainer_config().config_from_upstream(cls, args)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise MiraiError(message)


def _trainer_config() -> Any:
    # The official key mapping depends on this module's rules, not the other way round.
    from mirai_plugin.official import trainer_config

    return trainer_config
