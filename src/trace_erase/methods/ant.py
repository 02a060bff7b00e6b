"""ANT (Li et al. 2025) as a trajectory-engine configuration.

Positive guidance in a keep window, reversed guidance in the rest of the trajectory, and an unconditional term; LoRA
on cross-attention (ANT fine-tunes the full model, or a LoRA in its multi-concept code: see below). Defaults: the
field is kept at the noisy start, the first 7 of 50 steps from pure noise (t ≥ 860, τ = 0.86 of the time range);
weights β = 1 on the keep term and γ = 0.5 on the unconditional one; states drawn uniformly over each pool
trajectory's steps. With η = 1 the positive-guidance target ε*(∅) + η(ε*(c) − ε*(∅)) is θ*'s own prediction ε*(c).

What ANT's public code does (read at github.com/lileyang1210/ANT), and where this port differs:

* ``Single/train-scripts/train_ant_single.py`` with ``Single/configs/ant_train.yaml`` (``before_step`` 7 of
  ``ddim_steps`` 50, ``alpha1`` 1, ``alpha2`` 0.5, guidance 3 for sampling, η 1): each iteration samples one fresh
  trajectory and takes two states from it. The keep state is labelled with a time in [20k, 20k + 20) for k < 7, so
  t < 140: the field is kept at the CLEAN end, the last 7 of 50 steps; the other state (t ≥ 140) gets the reversed
  target. One state per window, weight 1 each (α₁ = 1 on the keep term). Its unconditional terms compare two
  predictions computed without gradient, so they train nothing whatever ``alpha2`` says. The trajectories come from
  the model being fine-tuned (ours: from θ*, in a pool refreshed every ``refresh_every`` steps), and it fine-tunes
  every weight under a gradient-saliency mask (ours: a LoRA).
* ``Multiple/train_ant.py`` with ``Multiple/examples/config.yaml`` (``before_step`` 4 of 50, ``alpha_1`` 2.5,
  ``alpha_2`` 0.5, LoRA rank 64): the keep state is taken after k < 4 sampler steps from pure noise and labelled
  t = 999 − 20k, so the field is kept at the NOISY start (t ≥ 939, which τ = 0.92 gives on a 50-step schedule),
  as the paper's text describes.
  Two states per window per iteration (``batch_size`` 2). Weights: reversal 1, unconditional at the erase-window
  state 2.5, keep 0.5, unconditional at the keep-window state 1.25 — all with gradient. The trained output is the
  LoRA model's classifier-free-guided prediction at scale 7.5 (both branches through the LoRA), against the frozen
  model's guided prediction (keep) and ε0(∅) − 7.5(ε0(c) − ε0(∅)) (reversal); its LoRA (alpha 1, so scaled 1/64)
  sits on every linear layer of the transformer blocks and on the ResNet and resampling convolutions. One LoRA per
  concept, merged by ``Multiple/fuse_lora_ant.py`` with MACE's closed-form fusion.

Each reading as options (``--option KEY=VALUE``):

* single-concept code: ``keep_end=clean tau=0.14 window_sampling=balanced gamma=0`` (β = η = 1 and sampling
  guidance 3 are the defaults). The engine divides each term by the batch size, so a balanced batch of 2 halves
  every term alike; Adam's steps do not change with a constant factor on the loss.
* multi-concept code, nearest: ``tau=0.92 window_sampling=balanced batch_size=4 beta=0.5 gamma=1.875 rank=64``.
  One γ weighs the unconditional term of both windows, where ANT's code has 2.5 and 1.25 (1.875 is their mean);
  guided-output training, its layer set and its LoRA scale are not reproduced (docs/methods.md says why).

Several concepts: ``--multi fuse`` by default (engines/fusion.py: MACE's stage 3 written as a LoRA), with the
multi-concept cut-off τ = 0.92.
"""

from .base import MethodSpec

ANT = MethodSpec(
    name="ant",
    engine="trajectory",
    summary="ANT: positive guidance before an early cut-off, reversed after it, unconditional terms kept",
    trajectory={"window": "two", "early_mode": "positive", "tau": 0.86, "eta": 1.0, "beta": 1.0, "gamma": 0.5,
                "lora_targets": "cross-attn", "rank": 4, "lr": 1e-4, "steps": 1000, "rollout_guidance": 3.0},
    multi_default="fuse",
    multi_trajectory={"tau": 0.92},
)
