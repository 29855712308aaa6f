"""Checkpoint conversion: diffusers UNet2DModel / pytorch_diffusion <-> fastddpm.

diffusers is the reference here (a test-only peer): a UNet2DModel built from the
ddpm-cifar10-32 configuration with random weights (nothing is downloaded) is written with
its own save_pretrained, converted by `fastddpm convert`, and the two networks must agree on
fresh random inputs and timesteps to fp32 precision (relative error 1e-5; measured ~2e-6).
Most cases use a reduced width/depth variant of that config (3 levels, 32 channels, 16x16,
attention at 8x8) so they run in a second; one case runs the full 35.7M-parameter model.
"""
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fastddpm.checkpoint import load_checkpoint, save_checkpoint
from fastddpm.cli import main
from fastddpm.convert import diffusion_from_scheduler
from fastddpm.noise import noise
from fastddpm.sampling import reference_step
from fastddpm.schedule import make_betas
from fastddpm.unet import UNet, UNetConfig, count_parameters

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

from helpers import randomized_unet, rel_err  # noqa: E402

# google/ddpm-cifar10-32's config.json as the hub serves it (keys of diffusers 0.0.4: no
# attention_head_dim, which meant one attention head then).
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# The same family, reduced: 3 levels of 32/64/64 channels at 16x16, attention at 8x8, 8 groups.
SMALL_CONFIG = {**CIFAR10_CONFIG, "block_out_channels": [32, 64, 64], "norm_num_groups": 8, "sample_size": 16,
                "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": None}
CIFAR10_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                         variance_type="fixed_large", clip_sample=True)
TOL = 1e-5  # fp32 relative error


def diffusers_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """UNet2DModel of `config` with every parameter random (norms get a random affine too).

    A config without attention_head_dim (diffusers 0.0.4's) meant one head; today's UNet2DModel
    would read the missing key as 8, so it is passed explicitly.
    """
    torch.manual_seed(seed)
    kwargs = {"attention_head_dim": None, **{k: v for k, v in config.items() if not k.startswith("_")}}
    model = UNet2DModel(**kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1.0 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    return model.eval()


def random_inputs(batch: int, size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


# The folder `fastddpm convert CHECKPOINT --out DIR` writes: a DDPMPipeline (relative paths, folders too).
PIPELINE_FILES = ["model_index.json", "scheduler", "scheduler/scheduler_config.json", "unet", "unet/config.json",
                  "unet/diffusion_pytorch_model.safetensors"]


def tree(folder) -> list[str]:
    """Every path under `folder`, relative, sorted (temporary files would show up here)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def snapshot(*paths) -> dict:
    """{path: bytes} of every file under (or at) `paths`: compare before and after to prove nothing changed."""
    out = {}
    for root in map(Path, paths):
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if p.is_file() and not p.is_symlink():
                out[str(p)] = p.read_bytes()
    return out


def one_line(err: str) -> bool:
    """stderr is exactly one `fastddpm: error: ...` line, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return len(lines) == 1 and lines[0].startswith("fastddpm: error: ") and "Traceback" not in err


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def converted_outputs(tmp_path, dmodel: UNet2DModel, src, capsys, size: int, extra=()):
    """Convert `src` with the CLI; (fastddpm output, diffusers output, loaded model, diffusion, meta)."""
    dst = tmp_path / "converted.safetensors"
    code, out, err = run_cli(["convert", src, "--out", dst, *extra], capsys)
    assert code == 0, err
    model, diffusion, meta = load_checkpoint(dst)
    x, t = random_inputs(3, size)
    with torch.no_grad():
        ours, theirs = model(x, t), dmodel(x, t).sample
    return ours, theirs, model, diffusion, meta


# ------------------------------------------------------------------------------------ diffusers in
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_diffusers_folder_converts_and_matches(tmp_path, capsys, safe_serialization):
    dmodel = diffusers_unet(SMALL_CONFIG)
    folder = tmp_path / "ddpm"
    dmodel.save_pretrained(folder, safe_serialization=safe_serialization)
    DDPMScheduler(**CIFAR10_SCHEDULER).save_pretrained(folder)
    ours, theirs, model, diffusion, meta = converted_outputs(tmp_path, dmodel, folder, capsys, 16)
    assert rel_err(ours, theirs) < TOL
    assert count_parameters(model) == sum(p.numel() for p in dmodel.parameters())
    assert model.config.norm_eps == 1e-6 and model.config.attention_resolutions == (8,)
    # The diffusion settings came along: DDPM's linear schedule, T = 1000, sigma^2 = beta, clipping.
    assert diffusion.var_type == "fixedlarge" and diffusion.mean_type == "eps"
    torch.testing.assert_close(diffusion.schedule.betas, make_betas("linear", 1000), rtol=0, atol=0)
    assert meta["clip_denoised"] is True and meta["converted_from"] == "diffusers"


def test_legacy_attention_names_and_pipeline_layout(tmp_path, capsys):
    """Weights saved before diffusers 0.13 (query/key/value/proj_attn), in a pipeline's unet/ + scheduler/."""
    from safetensors.torch import save_file

    dmodel = diffusers_unet(SMALL_CONFIG, seed=3)
    legacy = {}
    for k, v in dmodel.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v.contiguous()
    assert any(".query." in k for k in legacy)
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    config = {k: v for k, v in SMALL_CONFIG.items() if k != "attention_head_dim"}  # as the 0.0.4 configs
    (tmp_path / "pipe" / "unet" / "config.json").write_text(json.dumps(config))
    save_file(legacy, tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    DDPMScheduler(**{**CIFAR10_SCHEDULER, "variance_type": "fixed_small"}).save_pretrained(tmp_path / "pipe" / "scheduler")
    ours, theirs, _, diffusion, _ = converted_outputs(tmp_path, dmodel, tmp_path / "pipe", capsys, 16)
    assert rel_err(ours, theirs) < TOL
    assert diffusion.var_type == "fixedsmall"


@pytest.mark.slow
def test_full_size_ddpm_cifar10_parity(tmp_path, capsys):
    """The real ddpm-cifar10-32 architecture (35,746,307 parameters), random weights."""
    dmodel = diffusers_unet(CIFAR10_CONFIG)
    dmodel.save_pretrained(tmp_path / "ddpm-cifar10-32")
    DDPMScheduler(**CIFAR10_SCHEDULER).save_pretrained(tmp_path / "ddpm-cifar10-32")
    ours, theirs, model, diffusion, _ = converted_outputs(tmp_path, dmodel, tmp_path / "ddpm-cifar10-32", capsys, 32)
    assert count_parameters(model) == 35_746_307
    assert rel_err(ours, theirs) < TOL
    assert diffusion.var_type == "fixedlarge" and diffusion.num_timesteps == 1000


def test_converted_checkpoint_samples_from_the_cli(tmp_path, capsys):
    dmodel = diffusers_unet(SMALL_CONFIG)
    dmodel.save_pretrained(tmp_path / "ddpm")
    DDPMScheduler(**CIFAR10_SCHEDULER).save_pretrained(tmp_path / "ddpm")
    ckpt = tmp_path / "ddpm.safetensors"
    assert run_cli(["convert", tmp_path / "ddpm", "--out", ckpt], capsys)[0] == 0
    code, _, err = run_cli(["sample", "--checkpoint", ckpt, "--steps", "3", "--batch", "2", "--device", "cpu",
                            "--no-progress", "--out", tmp_path / "samples"], capsys)
    assert code == 0, err
    images = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0


# ------------------------------------------------------------------------------------ diffusers out
def test_export_round_trip_through_diffusers(tmp_path, capsys):
    model = randomized_unet("tiny", seed=5, norm_eps=1e-6)
    diffusion = diffusion_from_scheduler(CIFAR10_SCHEDULER)[0]
    save_checkpoint(tmp_path / "ours.safetensors", model, diffusion)
    code, _, err = run_cli(["convert", tmp_path / "ours.safetensors", "--out", tmp_path / "exported"], capsys)
    assert code == 0, err
    # exactly the pipeline's files, published together: no temporary (safetensors' .tmpXXXX or ours) left
    assert tree(tmp_path / "exported") == PIPELINE_FILES
    dmodel = UNet2DModel.from_pretrained(tmp_path / "exported", subfolder="unet").eval()
    sched = DDPMScheduler.from_pretrained(tmp_path / "exported", subfolder="scheduler")
    assert sched.config.variance_type == "fixed_large" and sched.config.clip_sample
    assert sched.config.beta_schedule == "linear" and sched.config.num_train_timesteps == 1000
    x, t = random_inputs(2, 16, seed=7)
    with torch.no_grad():
        assert rel_err(dmodel(x, t).sample, model(x, t)) < TOL
    # ... and back: the same tensors, bit for bit.
    code, _, err = run_cli(["convert", tmp_path / "exported", "--out", tmp_path / "back.safetensors"], capsys)
    assert code == 0, err
    back, back_diffusion, _ = load_checkpoint(tmp_path / "back.safetensors")
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    torch.testing.assert_close(back_diffusion.schedule.betas, diffusion.schedule.betas, rtol=0, atol=0)


def test_learned_range_model_round_trips(tmp_path, capsys):
    """IDDPM's learned variances: 2C outputs, variance_type learned_range (same interpolation in diffusers)."""
    from fastddpm.diffusion import GaussianDiffusion

    model = randomized_unet("tiny", seed=6, learn_sigma=True, norm_eps=1e-6)
    save_checkpoint(tmp_path / "iddpm.safetensors", model,
                    GaussianDiffusion(make_betas("cosine", 1000), var_type="learned_range"))
    assert run_cli(["convert", tmp_path / "iddpm.safetensors", "--out", tmp_path / "hf"], capsys)[0] == 0
    dmodel = UNet2DModel.from_pretrained(tmp_path / "hf", subfolder="unet").eval()
    assert DDPMScheduler.from_pretrained(tmp_path / "hf", subfolder="scheduler").config.variance_type == "learned_range"
    x, t = random_inputs(2, 16, seed=8)
    with torch.no_grad():
        theirs = dmodel(x, t).sample
        assert theirs.shape[1] == 6 and rel_err(theirs, model(x, t)) < TOL
    assert run_cli(["convert", tmp_path / "hf", "--out", tmp_path / "back.safetensors"], capsys)[0] == 0
    _, back, _ = load_checkpoint(tmp_path / "back.safetensors")
    assert back.var_type == "learned_range"
    torch.testing.assert_close(back.schedule.betas, make_betas("cosine", 1000), rtol=0, atol=0)


def saved_tiny(tmp_path, seed: int = 5, name: str = "ours.safetensors"):
    """A "tiny" U-Net with random weights and DDPM's CIFAR-10 process, saved as a fastddpm checkpoint."""
    model = randomized_unet("tiny", seed=seed, norm_eps=1e-6)
    diffusion = diffusion_from_scheduler(CIFAR10_SCHEDULER)[0]
    save_checkpoint(tmp_path / name, model, diffusion)
    return tmp_path / name, model, diffusion


def assert_same_checkpoint(path, model, diffusion):
    """The checkpoint at `path` holds `model`'s weights and `diffusion`'s float64 betas, bit for bit."""
    back, back_diffusion, _ = load_checkpoint(path)
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert torch.equal(back_diffusion.schedule.betas, diffusion.schedule.betas)
    assert (back_diffusion.mean_type, back_diffusion.var_type) == (diffusion.mean_type, diffusion.var_type)


def test_export_is_a_ddpm_pipeline_that_diffusers_loads(tmp_path, capsys):
    from diffusers import DDPMPipeline

    src, model, diffusion = saved_tiny(tmp_path)
    out = tmp_path / "pipe"
    code, stdout, err = run_cli(["convert", src, "--out", out], capsys)
    assert code == 0, err
    assert tree(out) == PIPELINE_FILES and "DDPMPipeline" in stdout
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and isinstance(index["_diffusers_version"], str)
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    pipe = DDPMPipeline.from_pretrained(out)  # the folder as it is: no subfolder or class arguments
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    x, t = random_inputs(3, 16, seed=9)
    with torch.no_grad():
        assert rel_err(pipe.unet.eval()(x, t).sample, model(x, t)) < TOL
    ours, theirs = diffusion.schedule.betas, pipe.scheduler.betas
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    # diffusers builds the linear schedule in float32 (torch.linspace): ours to float32 precision
    assert ((theirs.double() - ours).abs() / ours).max().item() <= 2**-23
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images  # and it samples
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    # ... and back, from the pipeline folder and from its unet/ (the scheduler found in ../scheduler/)
    for i, back_from in enumerate((out, out / "unet")):
        code, _, err = run_cli(["convert", back_from, "--out", tmp_path / f"back{i}.safetensors"], capsys)
        assert code == 0, err
        assert_same_checkpoint(tmp_path / f"back{i}.safetensors", model, diffusion)


def test_model_index_picks_the_pipeline_over_stale_bare_files(tmp_path, capsys):
    """A folder that held a bare UNet2DModel export and now holds a pipeline reads as the pipeline."""
    folder = _small_folder(tmp_path)  # a bare UNet2DModel folder of another network
    DDPMScheduler(**{**CIFAR10_SCHEDULER, "variance_type": "fixed_small"}).save_pretrained(folder)
    src, model, diffusion = saved_tiny(tmp_path)
    assert run_cli(["convert", src, "--out", folder], capsys)[0] == 0
    assert (folder / "config.json").exists() and (folder / "model_index.json").exists()
    code, _, err = run_cli(["convert", folder, "--out", tmp_path / "back.safetensors"], capsys)
    assert code == 0, err
    assert_same_checkpoint(tmp_path / "back.safetensors", model, diffusion)


def test_first_hub_pipelines_keep_their_files_beside_model_index(tmp_path, capsys):
    """The ddpm-* pipelines as first published: model_index.json, config.json, the weights and
    scheduler_config.json side by side, no unet/ subfolder."""
    dmodel = diffusers_unet(SMALL_CONFIG, seed=4)
    folder = tmp_path / "ddpm-hub"
    dmodel.save_pretrained(folder)
    DDPMScheduler(**CIFAR10_SCHEDULER).save_pretrained(folder)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1", "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"]}))
    ours, theirs, _, diffusion, _ = converted_outputs(tmp_path, dmodel, folder, capsys, 16)
    assert rel_err(ours, theirs) < TOL and diffusion.var_type == "fixedlarge"


def test_a_pipeline_of_another_unet_is_refused(tmp_path, capsys):
    src, _, _ = saved_tiny(tmp_path)
    assert run_cli(["convert", src, "--out", tmp_path / "pipe"], capsys)[0] == 0
    index = tmp_path / "pipe" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "unet": ["diffusers", "UNet2DConditionModel"]}))
    code, _, err = run_cli(["convert", tmp_path / "pipe", "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and one_line(err) and "model_index.json" in err and "UNet2DConditionModel" in err
    assert not (tmp_path / "o.safetensors").exists()


def fail_flush_of(monkeypatch, name: str) -> None:
    """From now on, flushing the temporary file of any output named `name` fails with ENOSPC."""
    import errno

    from fastddpm import files

    real = files._fsync_path

    def fsync(path):
        if os.path.basename(path).startswith(f"{files.TMP_PREFIX}{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path)
    monkeypatch.setattr(files, "_fsync_path", fsync)


@pytest.mark.parametrize("failing", ["diffusion_pytorch_model.safetensors", "config.json", "scheduler_config.json",
                                     "model_index.json"])
def test_a_pipeline_is_published_all_or_nothing(tmp_path, capsys, monkeypatch, failing):
    src, _, _ = saved_tiny(tmp_path)
    # a pipeline already there (another model) stays exactly as it was
    other, _, _ = saved_tiny(tmp_path, seed=8, name="other.safetensors")
    assert run_cli(["convert", other, "--out", tmp_path / "old"], capsys)[0] == 0
    before = snapshot(tmp_path / "old")
    fail_flush_of(monkeypatch, failing)
    code, _, err = run_cli(["convert", src, "--out", tmp_path / "old"], capsys)
    assert code == 2 and one_line(err) and "out of space" in err
    assert snapshot(tmp_path / "old") == before and tree(tmp_path / "old") == PIPELINE_FILES
    # a new one is not created at all: neither the folder nor the missing folder above it
    code, _, err = run_cli(["convert", src, "--out", tmp_path / "new" / "pipe"], capsys)
    assert code == 2 and one_line(err) and not (tmp_path / "new").exists()


def test_export_refuses_a_safetensors_destination(tmp_path, capsys):
    save_checkpoint(tmp_path / "ours.safetensors", UNet.from_preset("tiny"), diffusion_from_scheduler({})[0])
    code, _, err = run_cli(["convert", tmp_path / "ours.safetensors", "--out", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "folder" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- pytorch_diffusion
def to_pytorch_diffusion_layout(sd: dict, levels: int) -> dict:
    """Rename a diffusers DDPM state dict to pesser/pytorch_diffusion's names (its model.py),
    written here independently of fastddpm.convert with plain regular expressions."""
    out = {}
    for k, v in sd.items():
        n = k.replace("time_embedding.linear_1", "temb.dense.0").replace("time_embedding.linear_2", "temb.dense.1")
        n = n.replace("conv_norm_out", "norm_out")
        n = n.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        n = n.replace("mid_block.attentions.0", "mid.attn_1")
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", n)
        if m:
            side, i, kind, j, rest = m.groups()
            level = int(i) if side == "down" else levels - 1 - int(i)
            part = {"resnets": f"block.{j}", "attentions": f"attn.{j}", "downsamplers": "downsample",
                    "upsamplers": "upsample"}[kind]
            n = f"{side}.{level}.{part}.{rest}"
        n = n.replace("time_emb_proj", "temb_proj").replace("conv_shortcut", "nin_shortcut")
        n = n.replace("group_norm", "norm").replace("to_out.0", "proj_out")
        n = re.sub(r"\.to_([qkv])\.", r".\1.", n)
        if re.search(r"\.(q|k|v|proj_out)\.weight$", n):
            v = v[:, :, None, None]  # pytorch_diffusion's projections are 1x1 convs
        out[n] = v.clone()
    return out


def test_pytorch_diffusion_ckpt_converts_and_matches(tmp_path, capsys):
    dmodel = diffusers_unet({**SMALL_CONFIG, "norm_num_groups": 32}, seed=11)  # pytorch_diffusion: always 32
    ckpt = tmp_path / "ema_diffusion_model" / "model-790000.ckpt"
    ckpt.parent.mkdir()
    torch.save(to_pytorch_diffusion_layout(dmodel.state_dict(), 3), ckpt)
    ours, theirs, model, diffusion, meta = converted_outputs(tmp_path, dmodel, ckpt, capsys, 16,
                                                             extra=["--image-size", "16", "--var-type", "fixedlarge"])
    assert rel_err(ours, theirs) < TOL
    assert model.config.attention_resolutions == (8,) and model.config.norm_eps == 1e-6
    assert diffusion.var_type == "fixedlarge" and meta["converted_from"] == "pytorch_diffusion"
    torch.testing.assert_close(diffusion.schedule.betas, make_betas("linear", 1000), rtol=0, atol=0)


def test_pytorch_diffusion_needs_the_image_size_when_it_cannot_be_guessed(tmp_path, capsys):
    dmodel = diffusers_unet(SMALL_CONFIG)
    torch.save(to_pytorch_diffusion_layout(dmodel.state_dict(), 3), tmp_path / "model.ckpt")
    code, _, err = run_cli(["convert", tmp_path / "model.ckpt", "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and "--image-size" in err and "3 resolution levels" in err


# ------------------------------------------------------------------------------- scheduler step
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_one_ddpm_scheduler_step_matches_reference_step(monkeypatch, variance):
    """DDPMScheduler.step against fastddpm's reference_step, the same z injected into diffusers.

    float64 with diffusers' tables set to our float64 betas: the update formulas agree to 1e-12.
    float32 as each ships: agree to 1e-5 for t >= 37. Below that diffusers' float32 step is itself
    off (beta_t = 1 - alphabar_t / alphabar_{t-1} cancels: 4.5e-5 relative at t = 1) while ours
    stays within 1e-6 of the float64 result, which the last assertion checks.
    """
    import diffusers.schedulers.scheduling_ddpm as ddpm

    sched = DDPMScheduler(**{**CIFAR10_SCHEDULER, "variance_type": variance})
    diffusion, meta = diffusion_from_scheduler(dict(sched.config))
    assert diffusion.var_type == variance.replace("_", "") and meta["clip_denoised"]
    sched64 = DDPMScheduler(**{**CIFAR10_SCHEDULER, "variance_type": variance})
    betas = diffusion.schedule.betas
    sched64.betas, sched64.alphas = betas, 1.0 - betas
    sched64.alphas_cumprod, sched64.one = torch.cumprod(1.0 - betas, 0), torch.tensor(1.0, dtype=torch.float64)
    seed, g = 123, torch.Generator().manual_seed(0)
    for t in (999, 500, 37, 1, 0):
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        z = noise(seed, t, x.shape, dtype=torch.float64)
        monkeypatch.setattr(ddpm, "randn_tensor", lambda shape, dtype=None, **kw: z.reshape(shape).to(dtype))
        ours64, x0_64 = reference_step(diffusion, x, t, eps, seed=seed)
        theirs64 = sched64.step(eps, t, x)
        assert rel_err(ours64, theirs64.prev_sample) < 1e-12, t
        assert rel_err(x0_64, theirs64.pred_original_sample) < 1e-12, t
        ours32, _ = reference_step(diffusion, x.float(), t, eps.float(), seed=seed)
        assert rel_err(ours32, ours64) < 1e-6, t
        if t >= 37:
            assert rel_err(ours32, sched.step(eps.float(), t, x.float()).prev_sample) < TOL, t


# ------------------------------------------------------------------------------------- bad input
def _small_folder(tmp_path, mutate_state=None, mutate_config=None):
    dmodel = diffusers_unet(SMALL_CONFIG)
    folder = tmp_path / "bad"
    dmodel.save_pretrained(folder)
    if mutate_state is not None:
        from safetensors.torch import load_file, save_file
        sd = load_file(folder / "diffusion_pytorch_model.safetensors")
        mutate_state(sd)
        save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    if mutate_config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        mutate_config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("case, mutate, expected", [
    ("missing", lambda sd: sd.pop("down_blocks.1.attentions.0.to_k.weight"),
     ["missing keys", "down_blocks.1.attentions.0.to_k.weight"]),
    ("unexpected", lambda sd: sd.update({"extra.head.weight": torch.ones(2)}),
     ["unexpected keys", "extra.head.weight"]),
    ("shape", lambda sd: sd.update({"conv_in.weight": torch.ones(32, 3, 5, 5)}),
     ["shape mismatches", "conv_in.weight (32, 3, 5, 5) (expected (32, 3, 3, 3))"]),
])
def test_key_problems_are_named_with_exit_2(tmp_path, capsys, case, mutate, expected):
    folder = _small_folder(tmp_path, mutate_state=mutate)
    dst = tmp_path / "o.safetensors"
    code, _, err = run_cli(["convert", folder, "--out", dst], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err
    assert not dst.exists()


def test_unsupported_config_is_named(tmp_path, capsys):
    folder = _small_folder(tmp_path, mutate_config=lambda c: c.update(flip_sin_to_cos=True))
    code, _, err = run_cli(["convert", folder, "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and "flip_sin_to_cos=True" in err
    folder = _small_folder(tmp_path, mutate_config=lambda c: c.update(attention_head_dim=8))
    code, _, err = run_cli(["convert", folder, "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and "one head" in err
    # diffusers' "learned" variance is the output itself, not its log as in IDDPM: refused, not misread.
    folder = _small_folder(tmp_path)
    (folder / "scheduler_config.json").write_text(json.dumps({**CIFAR10_SCHEDULER, "variance_type": "learned"}))
    code, _, err = run_cli(["convert", folder, "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and "variance_type='learned'" in err


def test_pickled_code_is_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"temb.dense.0.weight": Evil()}, f, protocol=2)
    code, _, err = run_cli(["convert", tmp_path / "evil.ckpt", "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and "weights_only" in err
    assert not marker.exists()


def test_missing_and_foreign_sources(tmp_path, capsys):
    code, _, err = run_cli(["convert", tmp_path / "nope", "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and "does not exist" in err
    torch.save({"foo.weight": torch.ones(1)}, tmp_path / "foreign.pt")
    code, _, err = run_cli(["convert", tmp_path / "foreign.pt", "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and "neither" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["convert", tmp_path / "empty", "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and "config.json" in err


def test_unet_config_norm_eps_round_trips_and_defaults():
    """Checkpoints written before UNetConfig had norm_eps load with the old 1e-5."""
    c = UNetConfig(norm_eps=1e-6)
    assert UNetConfig.from_dict(c.to_dict()) == c
    d = c.to_dict()
    d.pop("norm_eps")
    assert UNetConfig.from_dict(d).norm_eps == 1e-5
    assert UNet(c).norm_out.eps == 1e-6 and UNet(c).mid[1].norm.eps == 1e-6


# ------------------------------------------------------------------------------- hostile configs
@pytest.mark.parametrize("change, message", [
    ({"block_out_channels": ["32", 64, 64]}, "block_out_channels='32' must be an integer"),
    ({"block_out_channels": [0, 64, 64]}, "block_out_channels=0 must be an integer >= 1"),
    ({"block_out_channels": [-32, 64, 64]}, "block_out_channels=-32"),
    ({"block_out_channels": "abc"}, "must be a list of widths"),
    ({"block_out_channels": [32, 64, 100000]}, "asks for 100000 channels"),  # absurd width: validate bound
    ({"norm_num_groups": 0}, "norm_num_groups=0 must be an integer >= 1"),
    ({"norm_num_groups": "8"}, "norm_num_groups='8'"),
    ({"norm_num_groups": 7}, "do not split into 7 groups"),
    ({"sample_size": -16}, "sample_size=-16 must be an integer >= 1"),
    ({"sample_size": "16"}, "sample_size='16'"),
    ({"sample_size": 2**20}, "image_size=1048576 is out of range"),
    ({"sample_size": [16, 8]}, "images are square"),
    ({"in_channels": 0}, "in_channels=0"),
    ({"out_channels": -3}, "out_channels=-3"),
    ({"layers_per_block": 2.5}, "layers_per_block=2.5 must be an integer"),
    ({"layers_per_block": True}, "layers_per_block=True must be an integer"),
    ({"attention_head_dim": 0}, "attention_head_dim=0 must be an integer >= 1"),
    ({"norm_eps": "1e-6"}, "norm_eps='1e-6' must be a number"),
    ({"norm_eps": -1.0}, "norm_eps=-1.0 must be a number in \\(0.0, 1.0\\]"),
    ({"dropout": 2}, "dropout=2 must be a number in \\[0.0, 1.0\\]"),
    ({"down_block_types": 3}, "down_block_types=3 must be a list of block type names"),
])
def test_hostile_diffusers_config_is_named(change, message):
    from fastddpm.convert import unet_config_from_diffusers
    from fastddpm.errors import CheckpointError

    with pytest.raises(CheckpointError, match=message):
        unet_config_from_diffusers({**SMALL_CONFIG, **change})


@pytest.mark.parametrize("change, message", [
    ({"num_train_timesteps": "1000"}, "num_train_timesteps='1000' must be an integer"),
    ({"num_train_timesteps": 0}, "num_train_timesteps=0"),
    ({"num_train_timesteps": 10**9}, "num_train_timesteps=1000000000"),
    ({"beta_start": 1.0, "beta_end": 1.0}, r"beta\[0\] = 1.0"),
    ({"beta_start": -1e-4}, r"beta_start=-0.0001 must be a number in \(0.0, 1.0\]"),
    ({"beta_end": "0.02"}, "beta_end='0.02'"),
    ({"beta_schedule": "scaled_linear", "beta_start": -0.5}, "beta_start=-0.5"),
    ({"trained_betas": ["a"]}, "trained_betas must be a list of numbers"),
    ({"trained_betas": [0.1, 2.0]}, r"unusable process .*beta\[1\] = 2.0"),
    ({"variance_type": ["fixed_small"]}, "variance_type=\\['fixed_small'\\] is not supported"),
    ({"prediction_type": {"a": 1}}, "prediction_type="),
    ({"clip_sample": "yes"}, "clip_sample='yes' must be true or false"),
    ({"clip_sample_range": "1"}, "clip_sample_range='1'"),
])
def test_hostile_scheduler_config_is_named(change, message):
    from fastddpm.errors import CheckpointError

    with pytest.raises(CheckpointError, match=message):
        diffusion_from_scheduler({**CIFAR10_SCHEDULER, **change})


def test_hostile_scheduler_file_exits_2_naming_it(tmp_path, capsys):
    folder = _small_folder(tmp_path)
    (folder / "scheduler_config.json").write_text(json.dumps({**CIFAR10_SCHEDULER, "beta_start": 1, "beta_end": 1}))
    dst = tmp_path / "o.safetensors"
    code, _, err = run_cli(["convert", folder, "--out", dst], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "scheduler_config.json" in err and "beta" in err
    assert not dst.exists()
    (folder / "scheduler_config.json").unlink()
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "sample_size": -16}))
    code, _, err = run_cli(["convert", folder, "--out", dst], capsys)
    assert code == 2 and "config.json" in err and "sample_size=-16" in err and not dst.exists()


@pytest.mark.parametrize("value, message", [
    (torch.tensor(float("nan")), "non-finite weights"),
    (torch.tensor(3), "non-floating-point weights"),
])
def test_non_finite_or_integer_weights_are_not_converted(tmp_path, capsys, value, message):
    def poison(sd):
        w = sd["conv_in.bias"]
        sd["conv_in.bias"] = torch.full(w.shape, value.item(), dtype=value.dtype)

    folder = _small_folder(tmp_path, mutate_state=poison)
    code, _, err = run_cli(["convert", folder, "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and message in err and "conv_in.bias" in err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("key, value, message", [
    ("conv_in.weight", torch.ones(32), "conv_in.weight has shape \\[32\\]"),  # wrong rank
    ("conv_in.weight", torch.ones(0, 3, 3, 3), "every size positive"),  # zero width
    ("conv_out.weight", torch.ones(3, 32), "conv_out.weight has shape"),
])
def test_pytorch_diffusion_tensors_of_the_wrong_rank(tmp_path, capsys, key, value, message):
    sd = to_pytorch_diffusion_layout(diffusers_unet(SMALL_CONFIG).state_dict(), 3)
    sd[key] = value
    torch.save(sd, tmp_path / "model.ckpt")
    code, _, err = run_cli(["convert", tmp_path / "model.ckpt", "--out", tmp_path / "o.safetensors", "--image-size",
                            "16"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_fifo_and_devices_are_refused_without_blocking(tmp_path, capsys):
    import os
    import signal

    fifo = tmp_path / "weights.ckpt"
    os.mkfifo(fifo)

    def hung(signum, frame):
        raise AssertionError("convert blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)  # opening a FIFO for reading blocks until a writer comes: fail instead of hanging
    try:
        for src in (fifo, "/dev/zero"):
            code, _, err = run_cli(["convert", src, "--out", tmp_path / "o.safetensors"], capsys)
            assert code == 2 and "is not a regular file" in err and len(err.strip().splitlines()) == 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------- the scheduler's keys
@pytest.mark.parametrize("change, message", [
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True is not supported: .*zero terminal SNR"),
    ({"rescale_betas_zero_snr": "no"}, "rescale_betas_zero_snr='no' must be true or false"),
    ({"thresholding": True}, "thresholding=True is not supported"),
    ({"prediction_type": "v_prediction"}, "prediction_type='v_prediction' is not supported"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid' is not supported"),
    ({"variance_type": "fixed_large_log"}, "variance_type='fixed_large_log' is not supported"),
    ({"_class_name": "DDIMScheduler"}, "_class_name='DDIMScheduler' is not supported: .*DDPMScheduler"),
    ({"set_alpha_to_one": False}, r"keys fastddpm does not know \('set_alpha_to_one'\)"),
    ({"timestep_spacing": "middle"}, "timestep_spacing='middle' is not linspace, leading or trailing"),
    ({"steps_offset": -1}, "steps_offset=-1 is not an integer >= 0"),
    ({"dynamic_thresholding_ratio": 2.0}, r"dynamic_thresholding_ratio=2.0 is not a number in \(0, 1\]"),
    ({"timestep_values": [1, 2]}, r"timestep_values=\[1, 2\] is not null"),
    ({"tensor_format": "jax"}, "tensor_format='jax' is not pt or np"),
    ({"predict_epsilon": False, "prediction_type": "epsilon"}, "predict_epsilon=False and prediction_type='epsilon' "
                                                               "disagree"),
    ({"trained_betas": [0.01] * 10}, "trained_betas holds 10 values but num_train_timesteps is 1000"),
    ({"clip_sample": False, "clip_sample_range": -1}, "clip_sample_range=-1"),
])
def test_scheduler_settings_fastddpm_cannot_honour_are_named(change, message):
    from fastddpm.errors import CheckpointError

    with pytest.raises(CheckpointError, match=message):
        diffusion_from_scheduler({**CIFAR10_SCHEDULER, **change})


@pytest.mark.parametrize("extra", [
    {"timestep_spacing": "trailing", "steps_offset": 1},  # inference only
    {"thresholding": False, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0},  # unused without it
    {"rescale_betas_zero_snr": False, "clip_sample_range": 1.0},
    {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "_name_or_path": "google/ddpm-cifar10-32",
     "_use_default_values": ["steps_offset"]},  # diffusers' bookkeeping
    {"tensor_format": "pt", "timestep_values": None, "trained_betas": None},  # diffusers 0.1's configs
    {"predict_epsilon": True},  # before prediction_type
], ids=["inference", "thresholding-off", "defaults", "bookkeeping", "diffusers-0.1", "predict_epsilon"])
def test_scheduler_keys_that_do_not_change_the_process_are_accepted(extra):
    base, _ = diffusion_from_scheduler(CIFAR10_SCHEDULER)
    diffusion, meta = diffusion_from_scheduler({**CIFAR10_SCHEDULER, **extra})
    assert torch.equal(diffusion.schedule.betas, base.schedule.betas) and meta == {"clip_denoised": True}
    assert (diffusion.mean_type, diffusion.var_type) == ("eps", "fixedlarge")


def test_every_key_diffusers_writes_for_a_ddpm_scheduler_is_known():
    """DDPMScheduler's whole config (every __init__ key of the installed diffusers) reads, and the
    legacy predict_epsilon=false means x0 prediction as it did."""
    diffusion, meta = diffusion_from_scheduler(dict(DDPMScheduler(**CIFAR10_SCHEDULER).config))
    assert diffusion.var_type == "fixedlarge" and meta["clip_denoised"]
    assert diffusion_from_scheduler({**CIFAR10_SCHEDULER, "predict_epsilon": False})[0].mean_type == "x0"


def test_zero_terminal_snr_is_refused_because_its_alphabar_ends_at_zero(tmp_path, capsys):
    """diffusers' rescale_zero_terminal_snr always ends at beta = 1 (alphabar_{T-1} = 0 exactly), a
    process fastddpm refuses: converting the un-rescaled betas instead (what happened before) gave
    betas off by up to 0.98. So the whole conversion is refused, in one line."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    from fastddpm.diffusion import GaussianDiffusion
    from fastddpm.errors import FastDDPMError

    for betas in (make_betas("linear", 1000), make_betas("cosine", 100)):
        rescaled = rescale_zero_terminal_snr(betas.clone())
        assert rescaled[-1].item() == 1.0
        with pytest.raises(FastDDPMError, match=r"beta\[.*\] = 1.0"):
            GaussianDiffusion(rescaled)
    folder = _small_folder(tmp_path)
    (folder / "scheduler_config.json").write_text(json.dumps({**CIFAR10_SCHEDULER, "rescale_betas_zero_snr": True}))
    before = snapshot(folder)
    code, _, err = run_cli(["convert", folder, "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and one_line(err) and "rescale_betas_zero_snr" in err and "scheduler_config.json" in err
    assert snapshot(folder) == before and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("change, piece", [
    ({"set_alpha_to_one": False}, "set_alpha_to_one"),
    ({"_class_name": "DDIMScheduler"}, "DDIMScheduler"),
    ({"thresholding": True}, "thresholding"),
    ({"prediction_type": "v_prediction"}, "v_prediction"),
])
def test_refused_scheduler_settings_exit_2_and_change_nothing(tmp_path, capsys, change, piece):
    folder = _small_folder(tmp_path)
    (folder / "scheduler_config.json").write_text(json.dumps({**CIFAR10_SCHEDULER, **change}))
    before = snapshot(folder)
    code, _, err = run_cli(["convert", folder, "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and one_line(err) and piece in err
    assert snapshot(folder) == before and not (tmp_path / "o.safetensors").exists()


# --------------------------------------------------------------------------- inputs never destroyed
@pytest.mark.parametrize("case", ["the weights", "its config", "a hard link", "a symbolic link", "the folder",
                                  "a folder above"])
def test_an_import_never_writes_over_an_input(tmp_path, capsys, case):
    folder = _small_folder(tmp_path)
    DDPMScheduler(**CIFAR10_SCHEDULER).save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    named = weights
    if case == "a hard link":
        os.link(weights, tmp_path / "link.safetensors")
        out = tmp_path / "link.safetensors"
    elif case == "a symbolic link":
        (tmp_path / "sym.safetensors").symlink_to(weights)
        out = tmp_path / "sym.safetensors"
    else:
        out = {"the weights": weights, "its config": folder / "config.json", "the folder": folder,
               "a folder above": tmp_path}[case]
        named = {"its config": folder / "config.json", "the folder": folder, "a folder above": folder}.get(case, weights)
    before = snapshot(tmp_path)
    code, _, err = run_cli(["convert", folder, "--out", out], capsys)
    assert code == 2 and one_line(err), err
    assert f"--out {str(out)!r}" in err and repr(str(named)) in err and "the input" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("src, out, named", [
    ("ckpts/m.safetensors", "ckpts/m.safetensors", "ckpts/m.safetensors"),  # the checkpoint itself
    ("ckpts/m.safetensors", "ckpts", "ckpts/m.safetensors"),  # the folder it is in
    ("ckpts/m.safetensors", ".", "ckpts"),  # a folder above it
    ("pipe", "pipe/unet", "pipe/unet/config.json"),  # a pipeline's subfolder
    ("pipe", "pipe/unet/diffusion_pytorch_model.safetensors", "pipe/unet/diffusion_pytorch_model.safetensors"),
    ("pipe/unet", "pipe/scheduler/scheduler_config.json", "pipe/scheduler/scheduler_config.json"),
])
def test_no_conversion_writes_over_or_around_its_source(tmp_path, capsys, monkeypatch, src, out, named):
    (tmp_path / "ckpts").mkdir()
    saved_tiny(tmp_path / "ckpts", name="m.safetensors")
    assert run_cli(["convert", tmp_path / "ckpts" / "m.safetensors", "--out", tmp_path / "pipe"], capsys)[0] == 0
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_cli(["convert", src, "--out", out], capsys)
    assert code == 2 and one_line(err), err
    assert f"--out {out!r}" in err and "the input" in err and named in err
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- built-in checkpoints
@pytest.mark.parametrize("name", ["digits", "digits-hybrid"])
def test_built_in_checkpoints_convert_by_name(tmp_path, capsys, name):
    code, _, err = run_cli(["convert", name, "--out", tmp_path / "pipe"], capsys)
    assert code == 0, err
    assert tree(tmp_path / "pipe") == PIPELINE_FILES
    assert run_cli(["convert", tmp_path / "pipe", "--out", tmp_path / "back.safetensors"], capsys)[0] == 0
    model, diffusion, _ = load_checkpoint(name)
    assert_same_checkpoint(tmp_path / "back.safetensors", model, diffusion)


# --------------------------------------------------------------------------- output paths
@pytest.mark.parametrize("direction", ["export", "import"])
@pytest.mark.parametrize("case, piece", [
    ("under a file", "is not a folder"),
    ("in /proc", "system folder"),
    ("a 256-byte name", "limited to 255 bytes"),
    ("a 4096-byte path", "limited to 4095 bytes"),
])
def test_an_out_that_cannot_be_written_is_one_line(tmp_path, capsys, direction, case, piece):
    if direction == "export":
        src, name = saved_tiny(tmp_path)[0], "pipe"
    else:
        src, name = _small_folder(tmp_path), "o.safetensors"
        DDPMScheduler(**CIFAR10_SCHEDULER).save_pretrained(src)
    (tmp_path / "a-file").write_text("x")
    out = {"under a file": str(tmp_path / "a-file" / name), "in /proc": f"/proc/{name}",
           "a 256-byte name": str(tmp_path / ("n" * (256 - len(name)) + name)),
           "a 4096-byte path": str(tmp_path / "/".join(["d" * 200] * 21) / name)}[case]
    assert case != "a 4096-byte path" or len(out.encode()) >= 4096
    before, paths = snapshot(tmp_path), tree(tmp_path)
    code, _, err = run_cli(["convert", src, "--out", out], capsys)
    assert code == 2 and one_line(err) and piece in err, err
    assert snapshot(tmp_path) == before and tree(tmp_path) == paths


def test_a_safetensors_header_length_whose_low_byte_is_a_pickle_opcode_is_still_safetensors(tmp_path):
    """A safetensors file starts with its header's length, little-endian: a length of 0x...80 begins with the
    byte a pickle starts with. Detection must read the header, not guess from that byte (the calibrated
    digits-hybrid checkpoint was such a file, and `convert` took it for a pickle)."""
    from safetensors.torch import save_file

    from fastddpm.convert import read_weights_file

    for pad in range(0, 300):
        path = tmp_path / "w.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    tensors, metadata = read_weights_file(path)
    assert list(tensors) == ["w"] and metadata["pad"] == "x" * pad
