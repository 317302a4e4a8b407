"""creditlib's credit methods in verl (``pip install 'creditlib[verl]'``, which does not combine with
``[torchrl]``/``[rl]``: verl 0.9 pins tensordict<=0.10; this module needs only torch and numpy. See
``docs/verl.md``).

Three functions with verl's registry signatures, registered when this module is imported and verl
is importable: the policy loss and the clamped GRPO estimator under ``"grpo_lambda"``, and the
credit-method estimator under ``"creditlib"``:

* :func:`grpo_lambda_policy_loss` -- a policy loss for ``@register_policy_loss``
  (``actor_rollout_ref.actor.policy_loss.loss_mode=grpo_lambda``): the PPO-clipped surrogate with
  the eligibility-traced ratio ``exp(z)``, computed by :func:`creditlib.losses.grpo_lambda_loss`
  and aggregated like verl's ``agg_loss`` (``loss_agg_mode`` and ``config.global_batch_info``:
  data-parallel size, global token and sequence counts, ``loss_scale_factor``);
* :func:`grpo_lambda_advantage` -- an advantage estimator for ``@register_adv_est``
  (``algorithm.adv_estimator=grpo_lambda``): the group-relative GRPO advantage
  (:func:`creditlib.functional.group_advantage`) followed by the negative clamp ``max(A, c)``;
* :func:`credit_advantage` -- an advantage estimator (``algorithm.adv_estimator=creditlib``) that
  computes the advantages of a registered credit method (``CREDITLIB_CREDIT``, default
  ``prefix-gae``): per-token prefix-tree GAE ``[bs, T]`` from the response token ids, or the
  group / RLOO advantage. verl 0.9's ``compute_advantage`` passes no token ids to registered
  estimators; the estimator takes ``responses=`` when called directly and otherwise reads
  ``data.batch["responses"]`` of the verl ``compute_advantage`` call that invoked it (a frame of a
  ``verl.*`` module), and raises a ``ValueError`` saying so when verl has not loaded them (verl's
  V1 trainer fetches no response ids for its advantage step).

Turn-level methods (``turn-grpo``, ``turn-index``, ``anchor-state``, ``prefix-turn``: the
method's ``advantage_kind.turns``) credit each turn of a multi-turn rollout. The estimator reads
their inputs from the batch's ``non_tensor_batch`` (passed as ``non_tensor_batch=``, or that of the
verl ``compute_advantage`` call that invoked it), one entry per sample (see :data:`TURN_KEYS`):

==================  =================================================================================
key                 what
==================  =================================================================================
``turn_rewards``    creditlib's name: the reward after each turn, a list per sample (``[]``: none)
``turn_scores``     verl's name for the same (its agent loop writes ``extra_fields["turn_scores"]``);
                    read when ``turn_rewards`` is absent
``state_ids``       ``anchor-state`` only: the environment state before each turn (an int, a string
                    or a tuple, e.g. the observation text; ``-1`` / ``None``: unknown)
``turn_ids``        optional per-token turn ids (``-1`` off the policy's tokens); also read from
                    ``data.batch["turn_ids"]``. Default: each run of ``response_mask`` is a turn (verl
                    masks tool responses and observations out of ``response_mask``)
==================  =================================================================================

Lists shorter than the row's turn count are padded (reward 0, state unknown); entries for turns
the row does not have (e.g. cut off by verl's ``response_length``) are a ``ValueError`` unless
they are 0 / unknown. The outcome reward is the row's summed ``token_level_rewards``, added to
its last turn; the groups are the prompt ``uid``. Absent inputs for a turn method are a
``ValueError`` naming the key and what writes it; other methods never read ``non_tensor_batch``.

verl's V1 trainer with several outputs per session (``compute_advantage_for_multi_trajectories``)
applies its "final output of each session" rule to its built-in ``grpo`` only and hands registered
estimators every output as a trajectory; the group estimators here apply the same rule (the final
output of each ``{uid}_{session}`` is scored, its advantage broadcast to the session's other
outputs), reading the session keys from that verl call.

Without verl the module still imports and both functions work on plain tensors; only
:func:`register` needs verl. verl's configs are strict dataclasses that refuse unknown keys, so
the trace parameters come from the environment (read at each call, so they can be set per Ray
worker through ``ray_kwargs.ray_init.runtime_env.env_vars``) or are bound in code with
:func:`register`:

=========================  ===========  ==============================================
variable                   default      meaning
=========================  ===========  ==============================================
``CREDITLIB_TRACE_STYLE``  ``recent``   ``recent`` or ``both``
``CREDITLIB_TRACE_GAMMA``  ``1.0``      discount gamma in [0, 1]
``CREDITLIB_TRACE_LAM``    ``0.99``     trace decay lambda in [0, 1]
``CREDITLIB_TRACE_EPS``    ``0.0``      weight floor in [0, 1]
``CREDITLIB_CLAMP_MIN``    ``-0.1``     advantage clamp (a float <= 0, or ``none``)
``CREDITLIB_TRACE_NORMALIZE`` ``0``     ``1``: row-normalised trace weights
``CREDITLIB_CREDIT``       (unset)      a registered credit method: its trace and clamp
=========================  ===========  ==============================================

``CREDITLIB_CREDIT`` (e.g. ``gspo``, ``grpo-lambda-norm``, ``prefix-gae``) replaces the
``CREDITLIB_TRACE_*`` / ``CREDITLIB_CLAMP_MIN`` variables (setting both is a ``ValueError``);
``trace_style`` may also be ``sequence`` (GSPO's sequence-level ratio).

The clip range is verl's own ``actor.clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from .. import functional as F
from .._validation import check_clamp_min, check_style
from ..credit import CreditMethod, get_credit
from ..losses.functional import clamp_advantages, grpo_lambda_loss
from ..style import DecayStyle

__all__ = [
    "NAME",
    "ENV_VARS",
    "grpo_lambda_policy_loss",
    "grpo_lambda_advantage",
    "credit_advantage",
    "CREDIT_NAME",
    "TURN_KEYS",
    "credit_from_env",
    "make_credit_estimator",
    "make_policy_loss",
    "make_advantage_estimator",
    "style_from_env",
    "clamp_min_from_env",
    "register",
    "verl_available",
]

#: The name the policy loss and the clamped GRPO estimator are registered under.
NAME = "grpo_lambda"
#: The name the credit-method estimator is registered under.
CREDIT_NAME = "creditlib"

#: Environment variables read by the registered functions (see the module docstring).
ENV_VARS = {
    "style": "CREDITLIB_TRACE_STYLE",
    "gamma": "CREDITLIB_TRACE_GAMMA",
    "lam": "CREDITLIB_TRACE_LAM",
    "eps": "CREDITLIB_TRACE_EPS",
    "clamp_min": "CREDITLIB_CLAMP_MIN",
    "normalize": "CREDITLIB_TRACE_NORMALIZE",
    "credit": "CREDITLIB_CREDIT",
}
_DEFAULTS = {"style": "recent", "gamma": 1.0, "lam": 0.99, "eps": 0.0, "clamp_min": -0.1}
_DEFAULT_CREDIT = "prefix-gae"  # of the "creditlib" estimator when CREDITLIB_CREDIT is unset

#: The ``non_tensor_batch`` keys the turn-level methods read, first present key first: creditlib's
#: names, then verl's own where verl has one (``turn_scores``, written by verl's agent loop).
TURN_KEYS = {
    "turn_rewards": ("turn_rewards", "turn_scores"),
    "state_ids": ("state_ids",),
    "turn_ids": ("turn_ids",),
}
_FROM_ENV = object()  # sentinel: read the parameter from the environment at call time


# ----------------------------------------------------------------------------- configuration
def _env_float(name: str, default: float, environ: Mapping[str, str]) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from None


def style_from_env(environ: Optional[Mapping[str, str]] = None) -> DecayStyle:
    """The :class:`~creditlib.DecayStyle` described by ``CREDITLIB_TRACE_{STYLE,GAMMA,LAM,EPS}``.

    Unset variables take the defaults ``recent``, 1.0, 0.99, 0.0.

    Raises:
        ValueError: a value is not a number or is out of range (the message names the variable).
    """
    env = os.environ if environ is None else environ
    method = credit_from_env(env, conflicts=("style", "gamma", "lam", "eps", "normalize"))
    if method is not None:
        if method.entropy_quantile is not None:
            raise ValueError(f"{ENV_VARS['credit']}={method.name!r} selects tokens by entropy, which verl's "
                             "policy-loss signature cannot do (it receives no entropies): use another method")
        return method.trace if method.trace is not None else DecayStyle("recent", 1.0, 0.0)  # plain ratio
    style = (env.get(ENV_VARS["style"]) or _DEFAULTS["style"]).strip()
    vals = {k: _env_float(ENV_VARS[k], _DEFAULTS[k], env) for k in ("gamma", "lam", "eps")}
    raw_norm = (env.get(ENV_VARS["normalize"]) or "0").strip().lower()
    if raw_norm not in ("0", "1", "true", "false", "yes", "no", "off", "on", ""):
        raise ValueError(f"{ENV_VARS['normalize']} must be 0 or 1, got {raw_norm!r}")
    normalize = raw_norm in ("1", "true", "yes", "on")
    try:
        return DecayStyle(style, vals["gamma"], vals["lam"], vals["eps"], normalize=normalize)
    except ValueError as e:
        key = str(e).split(" ", 1)[0]
        var = ENV_VARS.get(key)
        raise ValueError(f"{var}: {e}" if var else str(e)) from None


def clamp_min_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """The advantage clamp from ``CREDITLIB_CLAMP_MIN`` (default -0.1; ``none`` disables it), or the
    clamp of the credit method named by ``CREDITLIB_CREDIT``."""
    env = os.environ if environ is None else environ
    method = credit_from_env(env, conflicts=("clamp_min",))
    if method is not None:
        return method.clamp_min
    raw = env.get(ENV_VARS["clamp_min"])
    if raw is not None and raw.strip().lower() in ("none", "null", "off"):
        return None
    c = _env_float(ENV_VARS["clamp_min"], _DEFAULTS["clamp_min"], env)
    try:
        return check_clamp_min(c, ENV_VARS["clamp_min"])  # the one clamp rule
    except ValueError:
        raise ValueError(f"{ENV_VARS['clamp_min']} must be a finite float <= 0 or 'none', got {raw!r}") from None


def credit_from_env(environ: Optional[Mapping[str, str]] = None, *, conflicts=()) -> Optional[CreditMethod]:
    """The credit method named by ``CREDITLIB_CREDIT`` (``None`` when unset).

    Raises:
        ValueError: unknown name, or one of the ``conflicts`` variables is set as well.
    """
    env = os.environ if environ is None else environ
    name = (env.get(ENV_VARS["credit"]) or "").strip()
    if not name:
        return None
    both = [ENV_VARS[k] for k in conflicts if (env.get(ENV_VARS[k]) or "").strip()]
    if both:
        raise ValueError(f"{ENV_VARS['credit']}={name!r} sets the trace and the clamp: unset {', '.join(both)} "
                         "(or register a credit method with the parameters you want)")
    try:
        return get_credit(name)
    except ValueError as e:
        raise ValueError(f"{ENV_VARS['credit']}: {e}") from None


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for verl's dataclass configs, OmegaConf ``DictConfig``s and plain dicts."""
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        try:
            value = config.get(key, default)
        except Exception:  # noqa: BLE001 - a config type whose get() refuses unknown keys
            value = getattr(config, key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def _clip_eps(config: Any) -> Tuple[float, float]:
    clip = float(_cfg_get(config, "clip_ratio", 0.2))
    return float(_cfg_get(config, "clip_ratio_low", clip)), float(_cfg_get(config, "clip_ratio_high", clip))


def _as_float(v) -> Optional[float]:
    if v is None:
        return None
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def _global_factor(mask: torch.Tensor, loss_agg_mode: str, info: Mapping[str, Any]) -> float:
    """Turn creditlib's local aggregation into verl's ``agg_loss`` (verl 0.9) with global batch info.

    verl: ``token-mean = sum / N_global * dp``; ``token-sum = sum * dp``; ``seq-mean-token-{mean,sum}
    = sum_i s_i / B_global * dp``; ``seq-mean-token-sum-norm = sum / B_global * dp / S``. creditlib
    divides by the local ``N`` / ``B'`` (and ``S``), so the ratio is a scalar.
    """
    dp = float(info.get("dp_size") or 1)
    if loss_agg_mode in ("token-mean", "token-sum"):
        n_local = float(mask.sum())
        if loss_agg_mode == "token-sum":
            return max(n_local, 1.0) * dp
        n_global = _as_float(info.get("batch_num_tokens"))
        return max(n_local, 1.0) / (n_global if n_global else max(n_local, 1.0)) * dp
    b_local = float((mask.sum(-1) > 0).sum())
    b_global = _as_float(info.get("global_batch_size"))
    denom = b_global if b_global else max(b_local, 1.0)
    return max(b_local, 1.0) / denom * dp


# ----------------------------------------------------------------------------- policy loss
def grpo_lambda_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    style: Optional[DecayStyle] = None,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """GRPO-lambda policy loss with verl's ``PolicyLossFn`` signature.

    Args:
        old_log_prob: float ``[bs, T]``, log-probs of the response tokens under the rollout-time policy.
        log_prob: float ``[bs, T]``, the same under the policy being trained (carries the gradient).
        advantages: float ``[bs, T]`` (verl's token-level advantages) or ``[bs]``.
        response_mask: ``[bs, T]`` bool/int, right-padded response mask.
        loss_agg_mode: ``"token-mean"``, ``"token-sum"``, ``"seq-mean-token-mean"``,
            ``"seq-mean-token-sum"`` or ``"seq-mean-token-sum-norm"``.
        config: verl's ``ActorConfig`` (or a DictConfig/dict): ``clip_ratio``, ``clip_ratio_low``,
            ``clip_ratio_high``, ``global_batch_info`` are read; missing keys take verl's defaults.
        rollout_is_weights: optional float ``[bs, T]`` (or ``[bs, 1]``) non-negative rollout
            importance-sampling weights, multiplied into the per-token loss as in verl's losses.
        style: the trace; ``None`` reads ``CREDITLIB_TRACE_*`` from the environment.

    Returns:
        ``(loss, metrics)``: the scalar loss and a dict of floats (``actor/pg_clipfrac`` is the
        fraction of tokens whose *traced* ratio is clipped, ``actor/ppo_kl`` the k1 estimate).

    The advantages are used as given (no clamp here: the ``grpo_lambda`` estimator clamps).
    Unlike verl's ``vanilla`` loss there is no dual-clip (``clip_ratio_c``) and no [-20, 20]
    clamp of the log-ratio: this is the paper's loss.
    """
    if style is None:
        style = style_from_env()
    if not isinstance(response_mask, torch.Tensor):
        raise ValueError(f"response_mask must be a torch.Tensor [bs, T], got {type(response_mask).__name__}")
    mask = response_mask.bool()  # [bs, T]
    if loss_agg_mode == "token-sum":
        aggregation = "token-mean"  # rescaled by the token count below
    else:
        aggregation = loss_agg_mode
    info = _cfg_get(config, "global_batch_info", {}) or {}
    scale = None
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = _as_float(info.get("loss_scale_factor")) or _as_float(_cfg_get(config, "loss_scale_factor"))

    adv = advantages  # [bs, T] or [bs]
    if rollout_is_weights is not None:
        # w >= 0, so -min(r A, clip(r) A) * w == -min(r (A w), clip(r) (A w)): fold w into A.
        if not isinstance(rollout_is_weights, torch.Tensor):
            raise ValueError("rollout_is_weights must be a torch.Tensor [bs, T] or [bs, 1], got "
                             f"{type(rollout_is_weights).__name__}")
        w = rollout_is_weights.to(log_prob.dtype)
        if w.shape not in (mask.shape, mask.shape[:1] + (1,)):
            raise ValueError(f"rollout_is_weights must have shape {tuple(mask.shape)} or "
                             f"({mask.shape[0]}, 1), got {tuple(w.shape)}")
        w = w.expand(mask.shape)  # [bs, T]
        if bool(((w < 0) & mask).any()):
            raise ValueError("rollout_is_weights must be non-negative on the response tokens")
        adv = (adv.unsqueeze(-1) if adv.dim() == 1 else adv) * w  # [bs, T]

    loss, m = grpo_lambda_loss(
        log_prob, old_log_prob.detach(), adv, mask, style, clip_eps=_clip_eps(config), clamp_min=None,
        aggregation=aggregation, loss_scale_factor=scale)
    loss = loss * _global_factor(mask, loss_agg_mode, info)
    metrics = {
        "actor/pg_clipfrac": float(m["traced_clip_fraction"]),
        "actor/ppo_kl": float(m["approx_kl"]),
        "actor/creditlib/trace_abs_mean": float(m["trace_abs_mean"]),
        "actor/creditlib/ratio_mean": float(m["ratio_mean"]),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- advantage estimator
def grpo_lambda_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index=None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: Optional[bool] = None,
    config: Any = None,
    *,
    clamp_min: Any = _FROM_ENV,
    **unused: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GRPO's group-relative advantage with the negative clamp, as a verl advantage estimator.

    ``A_i = (R_i - mean_g(R)) / (std_g(R) + epsilon)`` over the responses sharing a prompt ``uid``
    (``R_i`` = the response's summed token-level reward), then ``A_i <- max(A_i, clamp_min)``,
    broadcast over the response tokens. Groups of one response get advantage 0 (verl's ``grpo``
    gives them the raw score).

    Args:
        token_level_rewards: float ``[bs, T]``.
        response_mask: ``[bs, T]`` bool/int.
        index: ``[bs]`` array of prompt uids (verl passes ``non_tensor_batch["uid"]``).
        epsilon: added to the group std.
        norm_adv_by_std_in_grpo: divide by the group std (GRPO) or not (Dr. GRPO); ``None`` reads
            ``config.norm_adv_by_std_in_grpo`` (default True).
        config: verl's ``AlgoConfig`` (or DictConfig / dict), optional.
        clamp_min: float ``<= 0`` or ``None``; default: ``CREDITLIB_CLAMP_MIN`` (-0.1).

    Returns:
        ``(advantages, returns)``, both ``[bs, T]`` (0 on padding), like verl's estimators.
    """
    _check_estimator_inputs(token_level_rewards, response_mask, index)
    if clamp_min is _FROM_ENV:
        clamp_min = clamp_min_from_env()
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
    sessions = None if unused.get("_final_outputs") else _sessions_from_verl(token_level_rewards.shape[0])
    if sessions is not None:  # verl V1, several outputs per session: score the final outputs only
        return _per_session(lambda rows: grpo_lambda_advantage(
            token_level_rewards[rows], response_mask[rows], _take(index, rows), epsilon, norm_adv_by_std_in_grpo,
            config, clamp_min=clamp_min, _final_outputs=True)[0], sessions, response_mask)
    ids = _group_ids(index, token_level_rewards.device)  # [bs]
    scores = token_level_rewards.sum(-1)  # [bs]
    with torch.no_grad():
        adv = F.group_advantage(scores, scale="std" if norm_adv_by_std_in_grpo else "none", group_ids=ids,
                                eps=float(epsilon))  # [bs]
        adv = clamp_advantages(adv, clamp_min)
        adv = adv.unsqueeze(-1) * response_mask.to(adv.dtype)  # [bs, T]
    return adv, adv


def _check_estimator_inputs(token_level_rewards, response_mask, index) -> None:
    if not isinstance(token_level_rewards, torch.Tensor) or token_level_rewards.dim() != 2:
        raise ValueError("token_level_rewards must be a float tensor [bs, T], got "
                         f"{getattr(token_level_rewards, 'shape', type(token_level_rewards).__name__)}")
    if not isinstance(response_mask, torch.Tensor) or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"response_mask must be a tensor of shape {tuple(token_level_rewards.shape)}")
    bs = token_level_rewards.shape[0]
    if index is None or len(index) != bs:
        raise ValueError(f"index must give the prompt uid of each of the {bs} responses, got "
                         f"{None if index is None else len(index)} entries")


def _take(index, rows: torch.Tensor):
    """``index[rows]`` for verl's numpy uid array (or a list)."""
    import numpy as np

    return np.asarray(index, dtype=object)[rows.cpu().numpy()]


def _group_ids(index, device) -> torch.Tensor:
    """int64 ``[bs]`` group ids from verl's uid array (rows sharing a uid share a prompt)."""
    first: Dict[Any, int] = {}
    return torch.tensor([first.setdefault(u, len(first)) for u in index], dtype=torch.long, device=device)


def _verl_local(name: str, check: Callable[[Any], bool], depth: int = 6) -> Any:
    """A local variable ``name`` of a ``verl.*`` function up the call stack (``None`` if there is none).

    verl 0.9 passes registered estimators neither the response token ids nor the session keys of
    its V1 trainer; both are locals of the verl functions that call the estimator.
    """
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if str(frame.f_globals.get("__name__", "")).startswith("verl."):
            value = frame.f_locals.get(name)
            if value is not None and check(value):
                return value
        frame = frame.f_back
    return None


def _sessions_from_verl(bs: int) -> Optional[list]:
    """Session key of each row when verl's V1 ``compute_advantage_for_multi_trajectories`` called us
    with several outputs in some session, else ``None``."""
    keys = _verl_local("batch_keys", lambda v: isinstance(v, (list, tuple)) and len(v) == bs)
    if keys is None:
        return None
    sessions = []
    for key in keys:
        fields = str(key).rsplit("_", 2)
        if len(fields) != 3:
            return None  # not verl's "{uid}_{session}_{index}" keys
        sessions.append((f"{fields[0]}_{fields[1]}", int(fields[2])))
    if len({s for s, _ in sessions}) == bs:
        return None  # one output per session: every row is its own trajectory
    return sessions


def _per_session(score_rows: Callable[[torch.Tensor], torch.Tensor], sessions: list,
                 response_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's V1 rule for multi-output sessions: score the final output of each session and give
    every output of the session that advantage (its value at the final output's first token)."""
    final: Dict[str, Tuple[int, int]] = {}
    for row, (key, idx) in enumerate(sessions):
        if key not in final or final[key][0] < idx:
            final[key] = (idx, row)
    order = list(final)
    rows = torch.tensor([final[k][1] for k in order], dtype=torch.long)  # [S]
    adv_final = score_rows(rows)  # [S, T]
    first_tok = response_mask[rows].long().argmax(dim=1)  # [S]
    per_session = adv_final[torch.arange(len(order)), first_tok]  # [S]
    pos = {k: i for i, k in enumerate(order)}
    which = torch.tensor([pos[k] for k, _ in sessions], dtype=torch.long)  # [bs]
    adv = per_session[which].unsqueeze(-1) * response_mask.to(per_session.dtype)  # [bs, T]
    return adv, adv


def _verl_data_with(key: str, bs: int, T: int) -> Any:
    """The ``data`` (a ``DataProto``) of the verl ``compute_advantage`` call that invoked the
    estimator, found by its ``batch[key]`` being a ``[bs, T]`` tensor (``None`` when not called from verl)."""
    def fits(data) -> bool:
        batch = getattr(data, "batch", None)
        try:
            t = batch[key] if batch is not None and key in batch.keys() else None
        except Exception:  # noqa: BLE001 - not a DataProto-like object
            return False
        return isinstance(t, torch.Tensor) and tuple(t.shape) == (bs, T)

    return _verl_local("data", fits)


def _responses_from_verl(bs: int, T: int) -> Optional[torch.Tensor]:
    """``data.batch["responses"]`` of the verl ``compute_advantage`` call that invoked the estimator."""
    data = _verl_data_with("responses", bs, T)
    return None if data is None else data.batch["responses"]


# ----------------------------------------------------------------------------- turn-level inputs
_NTB_HINT = ("verl's legacy trainer (trainer.use_v1=False) keeps the rollout's non_tensor_batch up to "
             "compute_advantage; verl 0.9.1's default V1 trainer fetches only 'uid' for its advantage step")


def _data_from_verl(bs: int, T: int) -> Any:
    """The ``data`` (a ``DataProto``) of the verl ``compute_advantage`` call that invoked the estimator:
    its ``batch["response_mask"]`` is ``[bs, T]`` (``None`` when not called from verl)."""
    return _verl_data_with("response_mask", bs, T)


def _column(col: Any, key: str, bs: int) -> list:
    """The ``bs`` per-sample entries of ``non_tensor_batch[key]``: an object array of sequences (verl's
    layout for ragged lists), a 2-D array (rows), a list, or a 2-D tensor."""
    import numpy as np

    if isinstance(col, torch.Tensor):
        col = col.detach().cpu().numpy()
    if isinstance(col, (list, tuple)):
        rows = list(col)
    elif isinstance(col, np.ndarray) and col.ndim in (1, 2):
        rows = [col[i] for i in range(col.shape[0])]
    else:
        raise ValueError(f"non_tensor_batch[{key!r}] must hold one sequence per sample (a numpy object array of "
                         f"lists, a 2-D array or a list), got {type(col).__name__} "
                         f"{getattr(col, 'shape', '')}".rstrip())
    if len(rows) != bs:
        raise ValueError(f"non_tensor_batch[{key!r}] has {len(rows)} entries, expected one per sample ({bs})")
    return rows


def _sequence(entry: Any, key: str, row: int, fix: str) -> list:
    """One sample's entry of a per-turn column as a list (``None`` is a ``ValueError``: the row's
    rollout wrote nothing for the key)."""
    import numpy as np

    if entry is None:
        raise ValueError(f"non_tensor_batch[{key!r}][{row}] is None: the rollout of row {row} wrote no {key} "
                         f"({fix})")
    if isinstance(entry, torch.Tensor):
        entry = entry.detach().cpu().numpy()
    if isinstance(entry, np.ndarray):
        if entry.ndim != 1:
            raise ValueError(f"non_tensor_batch[{key!r}][{row}] must be 1-D (one entry per turn), got shape "
                             f"{entry.shape}")
        entry = entry.tolist()
    if not isinstance(entry, (list, tuple)):
        raise ValueError(f"non_tensor_batch[{key!r}][{row}] must be a sequence with one entry per turn, got "
                         f"{type(entry).__name__} {entry!r}")
    return list(entry)


def _turn_ids_input(mask: torch.Tensor, turn_ids: Any, data: Any, ntb: Optional[Mapping[str, Any]]
                    ) -> Tuple[torch.Tensor, str]:
    """int64 ``[bs, T]`` turn ids and where they came from: ``turn_ids=``, ``data.batch["turn_ids"]``,
    ``non_tensor_batch["turn_ids"]`` (per-sample sequences over the response tokens, padded with -1),
    or the runs of ``response_mask``."""
    import numpy as np

    bs, T = mask.shape
    source = "turn_ids"
    if turn_ids is None and data is not None:
        try:
            if "turn_ids" in data.batch.keys():
                turn_ids, source = data.batch["turn_ids"], "data.batch['turn_ids']"
        except Exception:  # noqa: BLE001 - a batch without keys()
            pass
    if turn_ids is None and ntb is not None and "turn_ids" in ntb:
        source = "non_tensor_batch['turn_ids']"
        rows = _column(ntb["turn_ids"], "turn_ids", bs)
        ids = torch.full((bs, T), -1, dtype=torch.long)  # [bs, T]
        for i, e in enumerate(rows):
            seq = _sequence(e, "turn_ids", i, "write its per-token turn ids, -1 off the policy's tokens")
            if len(seq) > T:
                raise ValueError(f"{source}[{i}] has {len(seq)} entries, more than the {T} response positions")
            try:
                ids[i, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
            except (TypeError, ValueError):
                raise ValueError(f"{source}[{i}] must hold integers, got {seq[:8]!r}") from None
        turn_ids = ids
    if turn_ids is None:
        return F.turn_ids_from_mask(mask), "response_mask"  # [bs, T]: each run of policy tokens is a turn
    if not isinstance(turn_ids, torch.Tensor):
        turn_ids = torch.as_tensor(np.asarray(turn_ids))
    if turn_ids.dtype.is_floating_point or turn_ids.dtype == torch.bool or tuple(turn_ids.shape) != (bs, T):
        raise ValueError(f"{source} must be an integer tensor [bs, T] = [{bs}, {T}], got {turn_ids.dtype} "
                         f"{tuple(turn_ids.shape)}")
    turn_ids = turn_ids.to(device=mask.device, dtype=torch.long)  # [bs, T]
    bad = (turn_ids >= 0) != mask  # [bs, T]
    if bool(bad.any()):
        i, t = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{source} must be >= 0 exactly on the response_mask tokens (the policy's), -1 elsewhere: "
                         f"row {i}, position {t} has turn id {int(turn_ids[i, t])} and response_mask "
                         f"{int(mask[i, t])}")
    return turn_ids, source


def _missing(what: str, keys: Tuple[str, ...], ntb: Optional[Mapping[str, Any]], method: CreditMethod,
             writes: str) -> ValueError:
    names = " or ".join(f"non_tensor_batch[{k!r}]" for k in keys)
    if ntb is None:
        where = ("no non_tensor_batch was given: pass non_tensor_batch= (verl's DataProto.non_tensor_batch), or "
                 "call the estimator through verl's compute_advantage")
    else:
        where = f"the batch's non_tensor_batch has no such key (its keys: {sorted(ntb)})"
    return ValueError(f"credit method {method.name!r} (advantage={method.advantage_kind.name!r}) credits turns and "
                      f"needs {what}: {names}, one list per sample; {writes}. Here {where}. {_NTB_HINT}.")


def _turn_inputs(method: CreditMethod, mask: torch.Tensor, ntb: Optional[Mapping[str, Any]], data: Any,
                 turn_ids: Any, turn_rewards_key: Optional[str], dtype: torch.dtype
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(turn_ids [bs, T], turn_rewards [bs, K], state_ids [bs, K] or None)`` of a verl batch."""
    import numbers

    kind = method.advantage_kind
    bs, T = mask.shape
    ids, ids_source = _turn_ids_input(mask, turn_ids, data, ntb)  # [bs, T]
    n_turns = (ids.max(dim=-1).values + 1).clamp(min=0).tolist()  # [bs] K_i
    K = max([1] + n_turns)
    cut = (f"row {{row}} has {{k}} turns in {ids_source} (verl cuts responses at rollout.response_length, "
           "which can drop the last turns)")

    # per-turn rewards
    keys = (turn_rewards_key,) if turn_rewards_key else TURN_KEYS["turn_rewards"]
    key = next((k for k in keys if ntb is not None and k in ntb), None)
    if key is None:
        raise _missing("per-turn rewards", keys, ntb, method,
                       "verl's agent loop writes AgentLoopOutput.extra_fields['turn_scores'] ([] when it has none); "
                       "your own agent loop can write extra_fields['turn_rewards'] = [r_0, ..., r_(K-1)] ([] for "
                       "an outcome reward only, which comes from token_level_rewards)")
    if key == "turn_rewards" and turn_rewards_key is None and "turn_scores" in ntb:
        def scores_something(e) -> bool:  # verl's turn_scores hold more than [] / zeros / None
            try:
                return e is not None and any(float(v) != 0 for v in _sequence(e, "turn_scores", 0, ""))
            except (TypeError, ValueError):
                return True

        scored = [i for i, e in enumerate(_column(ntb["turn_scores"], "turn_scores", bs)) if scores_something(e)]
        if scored:
            raise ValueError(f"non_tensor_batch has both 'turn_rewards' and verl's 'turn_scores' (nonzero in row "
                             f"{scored[0]}): pass turn_rewards_key= to say which holds the per-turn rewards")
    rewards = torch.zeros(bs, K, dtype=torch.float64)  # [bs, K]
    for i, e in enumerate(_column(ntb[key], key, bs)):
        seq = _sequence(e, key, i, "write [] for a row without per-turn rewards")
        try:
            vals = [float(v) for v in seq]
        except (TypeError, ValueError):
            raise ValueError(f"non_tensor_batch[{key!r}][{i}] must hold numbers (one reward per turn), got "
                             f"{seq[:8]!r}") from None
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"non_tensor_batch[{key!r}][{i}] holds a non-finite reward: {vals}")
        k_i = n_turns[i]
        extra = [k for k in range(k_i, len(vals)) if vals[k] != 0]
        if extra:
            raise ValueError(f"non_tensor_batch[{key!r}][{i}] gives {len(vals)} per-turn rewards (turn {extra[0]}: "
                             f"{vals[extra[0]]}) but " + cut.format(row=i, k=k_i))
        rewards[i, : min(len(vals), k_i)] = torch.tensor(vals[:k_i], dtype=torch.float64)

    # state ids (anchor-state)
    states = None
    if kind.needs_states:
        skey = TURN_KEYS["state_ids"][0]
        if ntb is None or skey not in ntb:
            raise _missing("state ids", (skey,), ntb, method,
                           "the environment state before each turn (an int, a string or a tuple, e.g. the "
                           "observation text; -1 or None: unknown). verl produces none: write them from your agent "
                           "loop, AgentLoopOutput.extra_fields['state_ids'] = [s_0, ..., s_(K-1)]")
        codes: Dict[Any, int] = {}
        states = torch.full((bs, K), -1, dtype=torch.long)  # [bs, K]
        for i, e in enumerate(_column(ntb[skey], skey, bs)):
            seq = _sequence(e, skey, i, "write [] when no state is known")
            for k, v in enumerate(seq):
                if hasattr(v, "item") and not isinstance(v, (str, bytes)):
                    v = v.item()  # numpy scalar
                if v is None or (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v == -1):
                    continue  # unknown
                if isinstance(v, bool) or not isinstance(v, (numbers.Integral, str, bytes, tuple)):
                    raise ValueError(f"non_tensor_batch[{skey!r}][{i}][{k}] must be an int, a string or a tuple "
                                     f"(-1 or None: unknown), got {type(v).__name__} {v!r}")
                if isinstance(v, numbers.Integral) and v < -1:
                    raise ValueError(f"non_tensor_batch[{skey!r}][{i}][{k}] = {v}: integer state ids are >= 0 "
                                     "(-1: unknown)")
                if k >= n_turns[i]:
                    raise ValueError(f"non_tensor_batch[{skey!r}][{i}] gives a state for turn {k} but "
                                     + cut.format(row=i, k=n_turns[i]))
                try:
                    states[i, k] = codes.setdefault(v, len(codes))  # equal ids -> equal codes, batch-wide
                except TypeError:
                    raise ValueError(f"non_tensor_batch[{skey!r}][{i}][{k}] is not hashable: {v!r}") from None
    return ids, rewards.to(device=mask.device, dtype=dtype), None if states is None else states.to(mask.device)


def credit_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index=None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: Optional[bool] = None,
    config: Any = None,
    *,
    responses: Optional[torch.Tensor] = None,
    method: Any = None,
    boundary: Optional[torch.Tensor] = None,
    non_tensor_batch: Optional[Mapping[str, Any]] = None,
    turn_ids: Any = None,
    turn_rewards_key: Optional[str] = None,
    **unused: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The advantages of a creditlib credit method, as a verl advantage estimator.

    ``R_i`` is the response's summed token-level reward and the groups are the prompt uids, as in
    verl's ``grpo``. ``method.advantages`` then gives the per-token prefix-tree GAE ``[bs, T]``
    (``advantage="prefix_td"``, from the response token ids) or the group / RLOO advantage
    broadcast over the tokens, clamp included. The method's ``scale`` decides the division by the
    group std (its epsilon is creditlib's 1e-4; verl's ``epsilon`` is not used).

    Turn-level methods (``method.advantage_kind.turns``) give every policy token of turn ``k`` its
    turn's advantage ``A[i, k]`` (:func:`creditlib.functional.turn_credit`): the turns are the runs
    of ``response_mask`` (or ``turn_ids``), the reward after turn ``k`` is
    ``non_tensor_batch["turn_rewards"][i][k]`` (else verl's ``"turn_scores"``) plus ``R_i`` on the
    last turn, and ``anchor-state`` compares turns that start from equal
    ``non_tensor_batch["state_ids"][i][k]``. Tool responses and padding (0 in ``response_mask``)
    get 0. The module docstring lists the keys and their layout.

    Args:
        token_level_rewards: float ``[bs, T]``.
        response_mask: ``[bs, T]`` bool/int, right-padded.
        index: ``[bs]`` prompt uids (verl's ``non_tensor_batch["uid"]``).
        norm_adv_by_std_in_grpo / config: checked against the method's ``scale`` (a contradiction,
            e.g. ``norm_adv_by_std_in_grpo=False`` with a ``scale="std"`` method, is a ``ValueError``).
        responses: int ``[bs, T]`` response token ids; default: ``data.batch["responses"]`` of the
            verl ``compute_advantage`` call that invoked this function.
        method: a :class:`~creditlib.credit.CreditMethod` or a registered name; default:
            ``CREDITLIB_CREDIT`` (unset: ``"prefix-gae"``).
        boundary: optional bool ``[bs, T]`` step ends (step-level prefix TD).
        non_tensor_batch: verl's ``DataProto.non_tensor_batch`` (turn-level methods only); default:
            that of the verl ``compute_advantage`` call that invoked this function.
        turn_ids: optional int ``[bs, T]`` turn of each response token (-1 off ``response_mask``);
            default: ``data.batch["turn_ids"]``, ``non_tensor_batch["turn_ids"]``, or the runs of
            ``response_mask``.
        turn_rewards_key: the ``non_tensor_batch`` key of the per-turn rewards; default: the first
            of :data:`TURN_KEYS` ``["turn_rewards"]`` present.

    Returns:
        ``(advantages, returns)``, both float ``[bs, T]``, 0 on padding (and on tool responses for
        turn-level methods).

    Raises:
        ValueError: bad inputs, or a prefix method without token ids (verl's V1 trainer loads none
            for its advantage step), or a per-token or turn-level method on verl V1 sessions with
            several outputs, or a turn-level method without its per-turn rewards (or, for
            ``anchor-state``, state ids) in ``non_tensor_batch``: the message names the key and
            what writes it.
    """
    _check_estimator_inputs(token_level_rewards, response_mask, index)
    if method is None:
        method = credit_from_env() or get_credit(_DEFAULT_CREDIT)
    method = get_credit(method)
    norm = norm_adv_by_std_in_grpo
    if norm is None:
        norm = _cfg_get(config, "norm_adv_by_std_in_grpo", None)
    if norm is not None and bool(norm) != (method.scale == "std"):
        raise ValueError(f"norm_adv_by_std_in_grpo={bool(norm)} contradicts credit method {method.name!r} "
                         f"(scale={method.scale!r})")
    bs, T = token_level_rewards.shape
    kind = method.advantage_kind  # what the method's advantage needs, from the registry
    if kind.needs_entropy:
        raise ValueError(f"credit method {method.name!r} (advantage={kind.name!r}) needs per-token entropies, which "
                         "verl does not pass to advantage estimators")
    sessions = None if unused.get("_final_outputs") else _sessions_from_verl(bs)
    if sessions is not None:
        if kind.per_token or kind.turns:
            raise ValueError(f"credit method {method.name!r} gives per-token advantages, which cannot be broadcast "
                             "to the other outputs of a verl V1 session (several outputs per session)")
        return _per_session(lambda rows: credit_advantage(
            token_level_rewards[rows], response_mask[rows], _take(index, rows), config=None, method=method,
            _final_outputs=True)[0],
            sessions, response_mask)
    mask = response_mask.bool()  # [bs, T]
    ids = _group_ids(index, token_level_rewards.device)  # [bs]
    scores = token_level_rewards.sum(-1)  # [bs]
    with torch.no_grad():
        if kind.needs_tokens and responses is None:
            responses = _responses_from_verl(bs, T)
            if responses is None:
                raise ValueError(
                    f"credit method {method.name!r} needs the response token ids: pass responses=[bs, T], or call it "
                    "through verl's compute_advantage with data.batch['responses'] loaded (verl's legacy trainer, "
                    "trainer.use_v1=False, does; verl's default V1 trainer does not fetch response ids for its "
                    "advantage step)")
        turns: Dict[str, Any] = {}
        if kind.turns:
            data = _data_from_verl(bs, T) if non_tensor_batch is None or turn_ids is None else None
            ntb = non_tensor_batch if non_tensor_batch is not None else getattr(data, "non_tensor_batch", None)
            t_ids, t_rewards, states = _turn_inputs(method, mask, ntb, data, turn_ids, turn_rewards_key,
                                                    scores.dtype)  # [bs, T], [bs, K], [bs, K] or None
            turns = dict(turn_ids=t_ids, turn_rewards=t_rewards, state_ids=states)
        adv = method.advantages(scores, mask, tokens=responses if kind.needs_tokens else None, group_ids=ids,
                                boundary=boundary, **turns)  # [bs, T] (per-token and turn kinds) or [bs]
        if adv.dim() == 1:
            adv = adv.unsqueeze(-1) * mask.to(adv.dtype)  # [bs, T]
    return adv, adv


# ----------------------------------------------------------------------------- factories and registration
def make_policy_loss(style: DecayStyle) -> Callable[..., Tuple[torch.Tensor, Dict[str, float]]]:
    """A verl policy loss with the trace bound to ``style`` (instead of the environment)."""
    check_style(style)

    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                    config=None, rollout_is_weights=None):
        return grpo_lambda_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                       config, rollout_is_weights, style=style)

    policy_loss.__doc__ = f"GRPO-lambda policy loss with style {style} (see grpo_lambda_policy_loss)."
    policy_loss._creditlib = True
    return policy_loss


def make_advantage_estimator(clamp_min: Optional[float]) -> Callable[..., Tuple[torch.Tensor, torch.Tensor]]:
    """A verl advantage estimator with the clamp bound to ``clamp_min`` (``None``: no clamp)."""
    clamp_min = check_clamp_min(clamp_min)  # the one clamp rule

    def estimator(token_level_rewards, response_mask, index=None, epsilon=1e-6, norm_adv_by_std_in_grpo=None,
                  config=None, **unused):
        return grpo_lambda_advantage(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo,
                                     config, clamp_min=clamp_min)

    estimator.__doc__ = f"GRPO advantage clamped at {clamp_min} (see grpo_lambda_advantage)."
    estimator._creditlib = True
    return estimator


grpo_lambda_policy_loss._creditlib = True
grpo_lambda_advantage._creditlib = True
credit_advantage._creditlib = True


def verl_available() -> bool:
    """True when verl can be imported here."""
    return importlib.util.find_spec("verl") is not None


def _core_algos():
    try:
        return importlib.import_module("verl.trainer.ppo.core_algos")
    except ImportError as e:
        raise ImportError("registering GRPO-lambda with verl needs verl: in a verl environment, "
                          "pip install --no-deps creditlib (verl pins tensordict<=0.10); "
                          f"import failed: {e}") from e


def make_credit_estimator(method: Any, *, turn_rewards_key: Optional[str] = None
                          ) -> Callable[..., Tuple[torch.Tensor, torch.Tensor]]:
    """A verl advantage estimator bound to one credit method (a :class:`CreditMethod` or a name);
    ``turn_rewards_key`` (turn-level methods) names the ``non_tensor_batch`` key of the per-turn
    rewards (default: ``"turn_rewards"``, else verl's ``"turn_scores"``)."""
    method = get_credit(method)

    def estimator(token_level_rewards, response_mask, index=None, epsilon=1e-6, norm_adv_by_std_in_grpo=None,
                  config=None, responses=None, non_tensor_batch=None, turn_ids=None, **unused):
        return credit_advantage(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo,
                                config, responses=responses, method=method, non_tensor_batch=non_tensor_batch,
                                turn_ids=turn_ids, turn_rewards_key=turn_rewards_key)

    estimator.__doc__ = f"Advantages of credit method {method.name!r} (see credit_advantage)."
    estimator._creditlib = True
    return estimator


def register(policy_loss_name: Optional[str] = NAME, adv_estimator_name: Optional[str] = NAME, *,
             style: Optional[DecayStyle] = None, clamp_min: Any = _FROM_ENV,
             credit_estimator_name: Optional[str] = None, credit: Any = None) -> None:
    """Register the policy loss and the advantage estimator in verl's registries.

    Called with no arguments when this module is imported (if verl is importable): ``grpo_lambda``
    for both, reading the environment at each call. Call it yourself, from a module that verl
    imports in its workers (``VERL_USE_EXTERNAL_MODULES`` / ``actor_rollout_ref.model.external_lib``),
    to bind parameters in code, e.g. ``register("grpo_lambda_both", "grpo_lambda_c02",
    style=DecayStyle("both", lam=0.95), clamp_min=-0.2)``. ``None`` skips one of the two.
    ``credit_estimator_name`` registers :func:`credit_advantage` too (the import registers it as
    ``"creditlib"``), bound to ``credit`` (a :class:`CreditMethod` or a name) when given, e.g.
    ``register(None, None, credit_estimator_name="prefix_gae_lambda", credit="prefix-gae-lambda")``.

    Raises:
        ImportError: verl is not installed (the message says how to install creditlib beside it).
        ValueError: the name is taken by a function that is not creditlib's.
    """
    core = _core_algos()
    if policy_loss_name is not None:
        fn = grpo_lambda_policy_loss if style is None else make_policy_loss(style)
        _check_free(core.POLICY_LOSS_REGISTRY, policy_loss_name, "policy loss")
        core.register_policy_loss(policy_loss_name)(fn)
    if adv_estimator_name is not None:
        fn = grpo_lambda_advantage if clamp_min is _FROM_ENV else make_advantage_estimator(clamp_min)
        registry = core.ADV_ESTIMATOR_REGISTRY
        _check_free(registry, adv_estimator_name, "advantage estimator")
        registry.pop(adv_estimator_name, None)  # ours (e.g. after a reload): verl refuses to re-register
        core.register_adv_est(adv_estimator_name)(fn)
    if credit_estimator_name is not None:
        fn = credit_advantage if credit is None else make_credit_estimator(credit)
        registry = core.ADV_ESTIMATOR_REGISTRY
        _check_free(registry, credit_estimator_name, "advantage estimator")
        registry.pop(credit_estimator_name, None)
        core.register_adv_est(credit_estimator_name)(fn)


def _check_free(registry: Mapping[str, Any], name: str, what: str) -> None:
    current = registry.get(name)
    if current is not None and not getattr(current, "_creditlib", False):
        raise ValueError(f"verl already has a {what} named {name!r} that is not creditlib's ({current!r})")


if verl_available():  # registration happens only where verl is importable
    try:
        register(credit_estimator_name=CREDIT_NAME)
    except ImportError as _e:  # verl is present but broken: the plain functions still work
        import warnings

        warnings.warn(f"creditlib.integrations.verl: verl is installed but could not be imported, so "
                      f"'{NAME}' was not registered: {_e}", RuntimeWarning, stacklevel=2)
