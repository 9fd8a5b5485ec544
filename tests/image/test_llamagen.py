"""LlamaGen interop: checkpoints load with the same codes and reconstructions, bad ones are named.

``RefVQ`` below is this test's own re-implementation of the forward pass of LlamaGen's
``VQModel`` (tokenizer/tokenizer_image/vq_model.py), with LlamaGen's parameter names: separate
q/k/v attention convs, ``nin_shortcut``, ``conv_blocks.<i>.res/attn/downsample/upsample``,
``quantize.embedding`` plus the ``codebook_used`` buffer, nearest code by the expanded
``|z|^2 + |e|^2 - 2 z.e`` on l2-normalised vectors, GroupNorm(32, eps 1e-6), swish, asymmetric
(0, 1, 0, 1) padding before the stride-2 convs and nearest upsampling. Widths are small for
speed (ch 32 instead of 128); levels, blocks, attention and codebook (16384 x 8) are VQ-16's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from provq_lightning.errors import ProvqError
from provq_lightning.image.tokenizer import ImageTokenizer

OFF = dict(lpips_weight=0.0, eval_lpips=False, eval_fid=False, disc_weight=0.0)


def gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class RefRes(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = gn(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = gn(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class RefAttn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = gn(c)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2) for m in (self.q, self.k, self.v))  # b, c, hw
        att = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c**0.5, dim=-1)
        out = torch.einsum("bij,bcj->bci", att, v).reshape(b, c, h, w)
        return x + self.proj_out(out)


class RefDown(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class RefUp(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level(blocks: list[nn.Module], attn: list[nn.Module], name: str | None, c: int) -> nn.Module:
    m = nn.Module()
    m.res, m.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    if name == "downsample":
        m.downsample = RefDown(c)
    elif name == "upsample":
        m.upsample = RefUp(c)
    return m


def run_level(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(m.res):
        h = block(h)
        if len(m.attn):
            h = m.attn[i](h)
    for name in ("downsample", "upsample"):
        if hasattr(m, name):
            h = getattr(m, name)(h)
    return h


class RefEncoder(nn.Module):
    def __init__(self, ch: int, mult: list[int], nres: int, z: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        c = ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            blocks = [RefRes(c if j == 0 else ch * m, ch * m) for j in range(nres)]
            c = ch * m
            attn = [RefAttn(c) for _ in range(nres)] if last else []
            self.conv_blocks.append(level(blocks, attn, None if last else "downsample", c))
        self.mid = nn.ModuleList([RefRes(c, c), RefAttn(c), RefRes(c, c)])
        self.norm_out, self.conv_out = gn(c), nn.Conv2d(c, z, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for m in [*self.conv_blocks, *self.mid]:
            h = run_level(m, h) if hasattr(m, "res") else m(h)
        return self.conv_out(swish(self.norm_out(h)))


class RefDecoder(nn.Module):
    def __init__(self, ch: int, mult: list[int], nres: int, z: int) -> None:
        super().__init__()
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(z, c, 3, 1, 1)
        self.mid = nn.ModuleList([RefRes(c, c), RefAttn(c), RefRes(c, c)])
        self.conv_blocks = nn.ModuleList()
        for i, m in enumerate(reversed(mult)):
            blocks = [RefRes(c if j == 0 else ch * m, ch * m) for j in range(nres + 1)]
            c = ch * m
            attn = [RefAttn(c) for _ in range(nres + 1)] if i == 0 else []
            up = "upsample" if i != len(mult) - 1 else None
            self.conv_blocks.append(level(blocks, attn, up, c))
        self.norm_out, self.conv_out = gn(c), nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in [*self.mid, *self.conv_blocks]:
            h = run_level(m, h) if hasattr(m, "res") else m(h)
        return self.conv_out(swish(self.norm_out(h)))


class RefQuantize(nn.Module):
    def __init__(self, k: int, d: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(k, d)
        self.register_buffer("codebook_used", torch.zeros(65536))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
        e = F.normalize(self.embedding.weight, dim=-1)
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
        idx = d.argmin(1)
        b, _, h, w = z.shape
        return e[idx].reshape(b, h, w, -1).permute(0, 3, 1, 2), idx.reshape(b, h, w)


class RefVQ(nn.Module):
    def __init__(self, ch=32, mult=(1, 1, 2, 2, 4), nres=2, z=32, k=16384, d=8) -> None:
        super().__init__()
        self.encoder = RefEncoder(ch, list(mult), nres, z)
        self.decoder = RefDecoder(ch, list(mult), nres, z)
        self.quantize = RefQuantize(k, d)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(z, d, 1), nn.Conv2d(d, z, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zq, idx = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(zq)), idx


def random_ref(seed: int, **kw) -> RefVQ:
    torch.manual_seed(seed)
    ref = RefVQ(**kw).eval()
    with torch.no_grad():  # non-trivial affine GroupNorm parameters, so a swapped one shows
        for m in ref.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return ref


def save(tmp_path, state: dict, name: str = "vq.pt", **extra) -> str:
    path = tmp_path / name
    torch.save({"model": state, **extra}, path)
    return str(path)


def test_vq16_parity_codes_and_reconstructions(tmp_path):
    ref = random_ref(0)
    path = save(tmp_path, ref.state_dict(), steps=1, args=argparse.Namespace(lr=1e-4))
    model = ImageTokenizer.from_llamagen(path, **OFF)
    assert model.hparams.ch_mult == [1, 1, 2, 2, 4] and model.hparams.num_codes == 16384
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref_recon, ref_codes = ref(x)
    codes = model.encode_codes(x)
    recon = model.reconstruct(x)
    assert codes.shape == ref_codes.shape == (2, 16, 16)
    assert (codes == ref_codes).float().mean() >= 0.999
    assert len(ref_codes.unique()) > 16  # the codes vary, so agreement is not trivial
    assert recon.shape == ref_recon.shape and ref_recon.std() > 0.05
    assert (recon - ref_recon).abs().max() <= 1e-3


def test_vq8_layout_ema_and_config_init_from(tmp_path):
    """VQ-8's 4 levels (8x down); ``weights="ema"`` and ``init_from: llamagen-ema:`` pick the
    EMA entry, not the model one."""
    kw = dict(mult=(1, 2, 2, 4), nres=1, k=256)
    live, ema = random_ref(1, **kw), random_ref(2, **kw)
    path = save(tmp_path, live.state_dict(), ema=ema.state_dict())
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ema_recon, ema_codes = ema(x)
        live_recon, _ = live(x)
    from_ema = ImageTokenizer.from_llamagen(path, weights="ema", **OFF)
    assert torch.equal(from_ema.encode_codes(x), ema_codes)
    assert (from_ema.reconstruct(x) - ema_recon).abs().max() <= 1e-3
    arch = dict(ch=32, ch_mult=[1, 2, 2, 4], num_res_blocks=1, z_channels=32, num_codes=256,
                code_dim=8)
    configured = ImageTokenizer(**arch, **OFF, init_from=f"llamagen-ema:{path}").eval()
    assert (configured.reconstruct(x) - ema_recon).abs().max() <= 1e-3
    default = ImageTokenizer(**arch, **OFF, init_from=f"llamagen:{path}").eval()
    assert (default.reconstruct(x) - live_recon).abs().max() <= 1e-3


def test_discriminator_entry_is_loaded(tmp_path):
    """LlamaGen's NLayerDiscriminator (``main.<i>``) lands in the PatchGAN (``net.<i>``)."""
    ref = random_ref(0, mult=(1, 2), nres=1, k=16)
    donor = ImageTokenizer(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, num_codes=16,
                           lpips_weight=0.0, eval_lpips=False, eval_fid=False)
    donor_disc = donor.loss.discriminator.state_dict()
    disc = {k.replace("net.", "main.", 1): v for k, v in donor_disc.items()}
    path = save(tmp_path, ref.state_dict(), discriminator=disc)
    model = ImageTokenizer.from_llamagen(path, lpips_weight=0.0, eval_lpips=False, eval_fid=False)
    for name, value in donor_disc.items():
        assert torch.equal(model.loss.discriminator.state_dict()[name], value), name


SMALL = dict(mult=(1, 2), nres=1, k=16)


def edited(tmp_path, edit) -> str:
    state = dict(random_ref(0, **SMALL).state_dict())
    edit(state)
    return save(tmp_path, state, name="bad.pt")


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s.pop("decoder.mid.2.conv2.bias"), "decoder.mid.2.conv2.bias"),
        (lambda s: s.pop("encoder.mid.1.k.weight"), "encoder.mid.1.k.weight"),
        (lambda s: s.update({"encoder.extra.weight": torch.zeros(1)}), "encoder.extra.weight"),
        (lambda s: s.update({"post_quant_conv.bias": torch.zeros(5)}), "post_quant_conv.bias"),
    ],
    ids=["missing", "missing-attention-part", "unknown", "shape"],
)
def test_bad_checkpoints_name_the_key(tmp_path, edit, named):
    path = edited(tmp_path, edit)
    with pytest.raises(ProvqError) as err:
        ImageTokenizer.from_llamagen(path, **OFF)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_refusals_are_one_line(tmp_path):
    path = save(tmp_path, random_ref(0, **SMALL).state_dict())
    small = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, num_codes=16)
    cases = [
        (lambda: ImageTokenizer.from_llamagen(tmp_path / "nope.pt"), "nope.pt not found"),
        (lambda: ImageTokenizer.from_llamagen(path, weights="ema"), "no 'ema' state dict"),
        (lambda: ImageTokenizer.from_llamagen(path, ch=64, **OFF), "ch is 64"),
        (lambda: ImageTokenizer(**small, init_from=f"llamagen:{path}", **OFF),
         "model.init_args.ch_mult is (1, 2, 2)"),
        (lambda: ImageTokenizer(**small, init_from=f"taming:{path}", **OFF), "llamagen:PATH"),
    ]
    (tmp_path / "text.pt").write_text("not a checkpoint")
    cases.append((lambda: ImageTokenizer.from_llamagen(tmp_path / "text.pt"), "weights_only"))
    for build, named in cases:
        with pytest.raises(ProvqError) as err:
            build()
        assert named in str(err.value) and "\n" not in str(err.value), str(err.value)


# -- provq-tokenize --format llamagen ---------------------------------------------------------
@pytest.fixture(scope="module")
def photo_run(sample_photos, tmp_path_factory) -> tuple:
    """A run folder (config.yaml + checkpoint) of a tiny 8x-down model on the shared photos."""
    import yaml

    run = tmp_path_factory.mktemp("run")
    init = dict(ch=16, ch_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=16, norm_groups=8,
                num_codes=64, code_dim=4, **OFF)
    torch.manual_seed(0)
    model = ImageTokenizer(**init)
    data = dict(root=str(sample_photos), image_size=64, batch_size=4, num_workers=0)
    cfg = {"model": {"class_path": "provq_lightning.image.tokenizer.ImageTokenizer",
                     "init_args": init},
           "data": {"class_path": "provq_lightning.datamodules.image_folder.ImageFolderDataModule",
                    "init_args": data}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": model.state_dict()}, run / "checkpoints" / "last.ckpt")
    return run, model.eval(), data


def llamagen_batch(code_dir, label_dir, numbers, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """What LlamaGen's CustomDataset (code path containing 'flip') + DataLoader + train_c2i.py
    make of the files: one random view per image, then ``x.reshape(B, -1)``, ``y.reshape(-1)``."""
    import numpy as np

    xs, ys = [], []
    for n in numbers:
        features = np.load(code_dir / f"{n}.npy")
        features = features[:, rng.integers(features.shape[1])]
        xs.append(torch.from_numpy(features))
        ys.append(torch.from_numpy(np.load(label_dir / f"{n}.npy")))
    x, y = torch.stack(xs), torch.stack(ys)
    return x.reshape(x.shape[0], -1), y.reshape(-1)


@pytest.mark.parametrize("ten_crop", [False, True], ids=["flip", "ten_crop"])
def test_llamagen_export_loads_in_llamagens_shapes(photo_run, tmp_path, ten_crop):
    import json

    import numpy as np

    from provq_lightning.datamodules.image_folder import ImageFolderDataModule
    from provq_lightning.image.llamagen_codes import views
    from provq_lightning.image.transforms import to_model_range
    from provq_lightning.tools.tokenize_cli import tokenize_main

    run, model, data = photo_run
    out = tmp_path / ("imagenet_code_c2i_flip_ten_crop" if ten_crop else "imagenet_code_flip")
    argv = ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), "--format",
            "llamagen", "--limit", "5", "--device", "cpu"]
    tokenize_main(argv + (["--ten-crop"] if ten_crop else []))
    code_dir, label_dir = out / "imagenet64_codes", out / "imagenet64_labels"
    assert sorted(p.name for p in code_dir.iterdir()) == [f"{n}.npy" for n in range(5)]
    aug = 10 if ten_crop else 2
    codes = np.load(code_dir / "0.npy")
    label = np.load(label_dir / "0.npy")
    assert codes.shape == (1, aug, 64) and codes.dtype == np.int64  # 8x8 grid, row-major
    assert label.shape == (1,) and label.dtype == np.int64
    x, y = llamagen_batch(code_dir, label_dir, range(5), np.random.default_rng(0))
    assert x.shape == (5, 64) and x.dtype == torch.long and y.shape == (5,)
    assert 0 <= int(x.min()) and int(x.max()) < 64
    # The files hold the model's codes of image n's views, labelled with its class index.
    source = dict(data, image_size=int(64 * 1.1) if ten_crop else 64)
    dm = ImageFolderDataModule(**source)
    dm.setup("predict")
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    wnids = sorted({p.name.split("_")[0] for p in Path(data["root"]).glob("*.JPEG")})
    for n in (0, 4):
        item = dm.predict_set[n]
        expected = model.encode_codes(views(to_model_range(item["image"][None]), 64, ten_crop)[0])
        assert np.array_equal(np.load(code_dir / f"{n}.npy")[0], expected.flatten(1).numpy())
        assert index[n]["key"] == item["key"]
        assert int(np.load(label_dir / f"{n}.npy")[0]) == wnids.index(item["key"].split("_")[0])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "llamagen" and meta["views"] == aug and meta["code_grid"] == [8, 8]


def test_llamagen_export_refusals(photo_run, tmp_path, capsys):
    """A second export into a used folder (stale numbered files would join LlamaGen's data set)
    and --ten-crop without --format llamagen stop in one line."""
    from provq_lightning.tools.tokenize_cli import tokenize_main

    run, _, _ = photo_run
    base = ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--device", "cpu", "--limit", "1"]
    out = tmp_path / "codes"
    tokenize_main(base + ["--out", str(out), "--format", "llamagen"])
    assert "contains 'flip'" in capsys.readouterr().err  # CustomDataset needs it in the path
    for extra, named in [(["--format", "llamagen"], "imagenet64_codes is not empty"),
                         (["--ten-crop"], "--ten-crop only applies to --format llamagen")]:
        with pytest.raises(SystemExit):
            tokenize_main(base + ["--out", str(out)] + extra)
        err = capsys.readouterr().err.strip()
        assert named in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("name", ["in1k_16x16", "in1k_24x24"])
def test_in1k_configs_train_with_llamagens_adam(name):
    """LlamaGen's vq_train.py: Adam(lr 1e-4, betas (0.9, 0.95)), no weight decay, clip 1.0. The
    configs' AdamW with weight_decay 0 takes exactly Adam's steps."""
    import yaml

    repo = Path(__file__).resolve().parents[2]
    init = yaml.safe_load((repo / "experiments" / f"{name}.yaml").read_text())["model"][
        "init_args"]
    assert (init["lr"], init["betas"], init["weight_decay"], init["grad_clip"]) == (
        1e-4, [0.9, 0.95], 0.0, 1.0)
    optimizer = {k: init[k] for k in ("lr", "betas", "weight_decay")}
    model = ImageTokenizer(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, num_codes=16,
                           **OFF, **optimizer)
    opt_g, _ = model.configure_optimizers()
    params = [p for group in opt_g.param_groups for p in group["params"]]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    adam = torch.optim.Adam(twins, lr=1e-4, betas=(0.9, 0.95))
    torch.manual_seed(0)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_g.step()
        adam.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins, strict=True))
