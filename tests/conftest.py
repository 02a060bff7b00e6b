"""Tiny pipelines built from the real classes' configs (seeded), saved once per session for loading tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trace_erase.models.builders import (  # noqa: E402
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)
from trace_erase.models.tokenizers import build_clip_tokenizer  # noqa: E402

BUILDERS = {
    "sd": lambda seed=0: tiny_sd_pipeline(seed),
    "sd2v": lambda seed=0: tiny_sd_pipeline(seed, prediction_type="v_prediction"),
    "sdxl": lambda seed=0: tiny_sdxl_pipeline(seed),
    "flux": lambda seed=0: tiny_flux_pipeline(seed),
    "sd3": lambda seed=0: tiny_sd3_pipeline(seed),
    "sd35": lambda seed=0: tiny_sd3_pipeline(seed, variant="sd35"),
    "sd3-no-t5": lambda seed=0: tiny_sd3_pipeline(seed, variant="no-t5"),
}
FAMILIES = list(BUILDERS)


def run_cli(args: list[str], processes: int = 1, timeout: int = 600):
    """The CLI in a child process (one thread per process, offline); with ``processes`` > 1 under ``accelerate
    launch`` on CPU processes over gloo. Returns the CompletedProcess."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
              "--num_machines", "1", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"] \
        if processes > 1 else [sys.executable]
    return subprocess.run([*launch, "-m", "trace_erase.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each tiny pipeline written with save_pretrained (safetensors), keyed by fixture name."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, build in BUILDERS.items():
        folder = root / name
        build().save_pretrained(folder)
        out[name] = str(folder)
    return out


@pytest.fixture(params=FAMILIES)
def family_pipe(request: pytest.FixtureRequest):
    """(fixture name, fresh tiny pipeline) for each family."""
    return request.param, BUILDERS[request.param]()


@pytest.fixture(scope="session")
def micro_sd(tmp_path_factory) -> str:
    """A micro toy-world SD model trained here (a few seconds): real toy vocabulary, the toy scorer reads it."""
    from trace_erase.toyworld.config import preset
    from trace_erase.toyworld.train import ToyTrainer

    out = tmp_path_factory.mktemp("micro") / "toy-sd"
    return str(ToyTrainer(preset("sd", micro=True), out, progress=False).run())


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A CLIPModel folder (random weights, 32-px images) with its tokenizer: the offline stand-in for a CLIP id."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tok = build_clip_tokenizer(("a", "photo", "of", "cat", "dog", "red", "blue"), max_length=16)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def stop_after_first_checkpoint(monkeypatch: pytest.MonkeyPatch, run) -> None:
    """Run ``run()`` with stage B interrupted (KeyboardInterrupt) right after its first checkpoint is written; the
    patch is undone afterwards, so the caller's next run resumes from that checkpoint."""
    from trace_erase.engines.trajectory import TrajectoryEngine

    original = TrajectoryEngine.save_checkpoint

    def save_then_stop(self, step, opt, pool):
        original(self, step, opt, pool)
        raise KeyboardInterrupt

    monkeypatch.setattr(TrajectoryEngine, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(TrajectoryEngine, "save_checkpoint", original)
