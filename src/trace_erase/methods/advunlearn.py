"""AdvUnlearn (Zhang et al., NeurIPS 2024, arXiv 2405.15234; code OPTML-Group/AdvUnlearn, SD 1.4) as a configuration
of the trajectory engine with its LoRA on the text encoders (engines/advunlearn.py).

Its code's settings (the README's training command, its argparse defaults for the rest): ESD's loss with η 1 on
states of start-guidance-3 trajectories of the bare concept prompt, the text encoder's transformer layers trained
(``text_encoder_full``), Adam at lr 1e-5, 1000 iterations of one state, the first 200 on the concept prompt (warmup)
and the rest on the prompt with 1 adversarial word embedding in front, from an inner attack of 30 Adam steps at lr
1e-3 restarted from a random word, and the utility term at weight 0.3 on 5 retain prompts a step.

Ours: a LoRA at each layer's full rank (α = r) on those layers' Linear weights for its full-weight training (the
layer norms and biases stay fixed), our built-in captions as the retain set (its COCO object prompts), states from
the replay pool, and — for a CPU-sized budget on the toy models — the attack every ``adversarial_every`` 10 steps
instead of every step. FLUX and SD3 are refused: their prompt tokens reach the denoiser through T5, which AdvUnlearn
never trains. docs/methods.md has the table.
"""

from .base import MethodSpec

TRAJECTORY = {"lora_targets": "text_encoder_full", "rank": 0, "lr": 1e-5, "steps": 1000, "batch_size": 1,
              "window": "all", "early_mode": "none", "eta": 1.0, "beta": 0.0, "gamma": 0.0, "rho": 0.0,
              "rollout_guidance": 3.0, "train_templates": ["{}"],
              "adversarial_every": 10, "adversarial_steps": 30, "adversarial_lr": 1e-3, "adversarial_tokens": 1,
              "advunlearn_retain_weight": 0.3, "advunlearn_retain_batch": 5, "advunlearn_warmup": 200,
              "advunlearn_attack": "pgd", "advunlearn_attack_init": "random"}

ADVUNLEARN = MethodSpec(
    name="advunlearn",
    engine="trajectory",
    summary="AdvUnlearn: ESD's loss on a text-encoder LoRA against an inner soft-prompt attack, with a utility term "
            "on retain captions",
    trajectory=TRAJECTORY,
    families=("sd", "sdxl"),
    family_reason="it trains CLIP text encoders, and FLUX and SD3 read the prompt's tokens through T5",
)
