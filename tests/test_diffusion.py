"""The diffusion model: the forward process's closed form against iterating it, the schedules' formulas, U-Net
shapes, guidance, samplers, image-to-image, PNG files, bad input, and training through the shared loop."""

import math

import pytest
import torch
from PIL import Image

from scratchlm.cli import main
from scratchlm.diffusion import DiffusionModel
from scratchlm.diffusion.sampling import guided_noise, img2img, sample, step_sequence
from scratchlm.diffusion.schedule import NoiseSchedule
from scratchlm.diffusion.unet import UNet, UNetConfig
from scratchlm.errors import ConfigError
from scratchlm.vision import CLIP, CLIPConfig

TINY_CLIP = dict(vision_d_model=16, vision_layers=1, vision_heads=2, text_d_model=16, text_layers=1, text_heads=2,
                 embed_dim=8)


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=8, cond_dim=8, n_heads=2))
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # zero-initialised: make the output depend on the input
    return unet.eval()


@pytest.fixture
def tiny_model_dir(tiny_unet, tmp_path):
    torch.manual_seed(0)
    model = DiffusionModel(tiny_unet, NoiseSchedule("cosine", 100), CLIP(CLIPConfig(**TINY_CLIP)))
    model.save(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_closed_form_q_sample_equals_iterating_the_forward_process(kind):
    schedule = NoiseSchedule(kind, 50)
    x0 = torch.tensor([0.8, -0.3, 0.0])
    for t in (0, 9, 49):
        # Deterministic part: with zero noise each step multiplies by sqrt(1 - beta): the product is sqrt(abar_t).
        x = x0.clone()
        for s in range(t + 1):
            x = schedule.q_step(x, s, torch.zeros(3))
        assert torch.allclose(x, schedule.q_sample(x0, torch.tensor([t]), torch.zeros(3)), atol=1e-6)
        # Random part: iterating with fresh noise gives N(sqrt(abar) x0, 1 - abar), as the closed form does.
        generator = torch.Generator().manual_seed(t)
        n = 40_000
        x = x0.expand(n, 3).clone()
        for s in range(t + 1):
            x = schedule.q_step(x, s, torch.randn(n, 3, generator=generator))
        closed = schedule.q_sample(x0.expand(n, 3), torch.full((n,), t), torch.randn(n, 3, generator=generator))
        abar = float(schedule.alphas_cumprod[t])
        for values in (x, closed):
            assert torch.allclose(values.mean(0), math.sqrt(abar) * x0, atol=0.02)  # 4 standard errors
            assert torch.allclose(values.var(0), torch.full((3,), 1 - abar), rtol=0.03, atol=1e-4)


def test_schedules_follow_their_papers():
    linear = NoiseSchedule("linear", 1000)
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(0.02)
    cosine = NoiseSchedule("cosine", 1000)
    f = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in (0, 500, 900)]
    assert cosine.alphas_cumprod[499].item() == pytest.approx(f[1] / f[0], rel=1e-4)  # Nichol & Dhariwal eq. 17
    assert cosine.alphas_cumprod[899].item() == pytest.approx(f[2] / f[0], rel=1e-4)
    with pytest.raises(ConfigError, match="unknown noise schedule"):
        NoiseSchedule("sigmoid", 10)


def test_unet_shapes_and_guidance(tiny_unet):
    x = torch.randn(3, 1, 16, 16)
    cond = torch.randn(3, 8)
    t = torch.tensor([0, 50, 99])
    assert tiny_unet(x, t, cond).shape == (3, 1, 16, 16)
    with torch.no_grad():
        conditional = tiny_unet(x, torch.full((3,), 7), cond)
        free = tiny_unet(x, torch.full((3,), 7), cond, torch.ones(3, dtype=torch.bool))
        assert torch.allclose(guided_noise(tiny_unet, x, 7, cond, 1.0), conditional, atol=1e-5)
        assert torch.allclose(guided_noise(tiny_unet, x, 7, cond, 0.0), free, atol=1e-5)
        assert torch.allclose(guided_noise(tiny_unet, x, 7, cond, 3.0), free + 3 * (conditional - free), atol=1e-5)
    assert not torch.allclose(conditional, free)  # the caption matters


def test_step_sequences():
    assert step_sequence("ddpm", 50, 9, 10) == list(range(9, -1, -1))
    ddim = step_sequence("ddim", 5, 99, 100)
    assert ddim[0] == 99 and ddim[-1] == 0 and len(ddim) == 5 and ddim == sorted(ddim, reverse=True)
    with pytest.raises(ConfigError, match="unknown sampler"):
        step_sequence("euler", 5, 99, 100)


def test_samplers_and_img2img(tiny_unet):
    schedule = NoiseSchedule("cosine", 20)
    cond = torch.randn(2, 8)
    for sampler in ("ddim", "ddpm"):
        images = sample(tiny_unet, schedule, cond, 16, sampler, num_steps=4, guidance=2.0, seed=0)
        assert images.shape == (2, 1, 16, 16) and images.abs().max() <= 1.0
        again = sample(tiny_unet, schedule, cond, 16, sampler, num_steps=4, guidance=2.0, seed=0)
        assert torch.equal(images, again)  # a seed fixes the result
    source = torch.rand(2, 1, 16, 16) * 2 - 1
    light = img2img(tiny_unet, NoiseSchedule("cosine", 1000), source, cond, strength=0.01, num_steps=50)
    heavy = img2img(tiny_unet, NoiseSchedule("cosine", 1000), source, cond, strength=1.0, num_steps=5)
    # An untrained model barely changes an image noised a little, and replaces one noised completely.
    assert (light - source).abs().mean() < 0.1 < (heavy - source).abs().mean()
    with pytest.raises(ConfigError, match="strength"):
        img2img(tiny_unet, schedule, source, cond, strength=1.5)


def test_load_sample_and_prompt_errors(tiny_model_dir):
    model = DiffusionModel.load(tiny_model_dir)
    assert model.sample("the digit 3", n=2, steps=2).shape == (2, 1, 16, 16)
    with pytest.raises(ConfigError, match="names no digit"):
        model.sample("a handwritten cat", n=1, steps=2)
    with pytest.raises(ConfigError, match="--n"):
        model.sample("the digit 3", n=0)


def test_cli_sample_and_img2img_write_pngs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["diffuse", "sample", str(tiny_model_dir), "--prompt", "a handwritten seven", "--n", "3",
                 "--steps", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png", "grid.png"]
    with Image.open(out / "0.png") as image:
        assert image.mode == "L" and image.size == (16, 16)
    edits = tmp_path / "edits"
    assert main(["diffuse", "img2img", str(tiny_model_dir), "--image", str(out / "0.png"), "--prompt", "the digit 1",
                 "--strength", "0.5", "--steps", "4", "--n", "2", "--out", str(edits)]) == 0
    assert (edits / "1.png").is_file() and (edits / "grid.png").is_file()
    capsys.readouterr()
    Image.new("L", (20, 20)).save(tmp_path / "big.png")
    assert main(["diffuse", "img2img", str(tiny_model_dir), "--image", str(tmp_path / "big.png"), "--prompt",
                 "the digit 1", "--out", str(edits)]) == 2
    err = capsys.readouterr().err
    assert "20x20 pixels" in err and "8x8 or 16x16" in err and len(err.strip().splitlines()) == 1
    assert main(["diffuse", "sample", str(tiny_model_dir), "--prompt", "a handwritten cat", "--out", str(out)]) == 2
    assert "names no digit" in capsys.readouterr().err


def test_training_resumes_exactly(tmp_path):
    from scratchlm.diffusion.train import train_diffusion

    torch.manual_seed(0)
    CLIP(CLIPConfig(**TINY_CLIP)).save(tmp_path / "clip")
    options = dict(batch_size=8, channels=8, num_steps=100, eval_interval=4, warmup_steps=1, progress=False,
                   eval_samples=0, final_samples=0)
    whole = train_diffusion(tmp_path / "whole", tmp_path / "clip", max_steps=4, **options)
    train_diffusion(tmp_path / "parts", tmp_path / "clip", max_steps=2, pictures=False, **options)
    parts = train_diffusion(tmp_path / "parts", max_steps=4, resume=True, progress=False, eval_samples=0,
                            final_samples=0, pictures=False)
    for (name, a), (_, b) in zip(whole.model.unet.state_dict().items(), parts.model.unet.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    loaded = DiffusionModel.load(tmp_path / "whole")
    assert loaded.schedule.num_steps == 100 and (tmp_path / "whole" / "clip" / "model.safetensors").is_file()
    assert (tmp_path / "whole" / "loss.png").is_file() and not (tmp_path / "parts" / "loss.png").exists()
    with pytest.raises(ConfigError, match="--clip"):
        train_diffusion(tmp_path / "none", None, max_steps=1)
