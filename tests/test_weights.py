import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file

from pulid_flux.engine.pulid import IDFormer, PuLIDModules
from pulid_flux.engine.weights import (
    CheckpointMismatchError,
    bfl_to_diffusers,
    bfl_vae_config,
    bfl_vae_to_diffusers,
    load_flux_transformer,
    load_flux_vae,
    load_pulid_checkpoint,
    pulid_key_manifest,
)

# ----------------------------------------------------------------------------- PuLID checkpoint


def small_modules() -> PuLIDModules:
    enc = IDFormer(
        dim=16, depth=10, dim_head=8, heads=2, output_dim=24, id_cond_dim=40, vit_hidden_dim=12, mapping_dim=20
    )
    return PuLIDModules(enc, num_double_blocks=19, num_single_blocks=38, ca_dim=32, ca_heads=2, ca_dim_head=8)


def random_checkpoint(manifest, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g).to(dtype) for k, shape in manifest.items()}


def test_small_modules_have_released_key_layout():
    assert set(pulid_key_manifest(small_modules())) == set(pulid_key_manifest())


def test_strict_load_of_released_layout(tmp_path):
    modules = small_modules()
    ckpt = random_checkpoint(pulid_key_manifest(modules))
    assert len(ckpt) == 312
    path = tmp_path / "pulid_flux_v0.9.1.safetensors"
    save_file(ckpt, str(path))
    load_pulid_checkpoint(modules, path)
    state = modules.state_dict()
    for key in ("pulid_encoder.latents", "pulid_encoder.layers.3.0.to_kv.weight", "pulid_ca.17.norm1.bias"):
        torch.testing.assert_close(state[key], ckpt[key].float(), rtol=0, atol=0)


def test_wrong_and_extra_keys_fail_clearly(tmp_path):
    modules = small_modules()
    ckpt = random_checkpoint(pulid_key_manifest(modules))
    ckpt["pulid_ca.3.to_k.weight"] = ckpt.pop("pulid_ca.3.to_kv.weight")
    ckpt["pulid_encoder.extra"] = torch.zeros(2)
    save_file(ckpt, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_pulid_checkpoint(modules, tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "missing keys (1): pulid_ca.3.to_kv.weight" in msg
    assert "pulid_ca.3.to_k.weight" in msg and "pulid_encoder.extra" in msg


def test_wrong_shape_fails_clearly(tmp_path):
    modules = small_modules()
    ckpt = random_checkpoint(pulid_key_manifest(modules))
    ckpt["pulid_ca.0.to_q.weight"] = torch.zeros(3, 3)
    save_file(ckpt, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"wrong shapes \(1\): pulid_ca.0.to_q.weight"):
        load_pulid_checkpoint(modules, tmp_path / "bad.safetensors")


def test_missing_file_names_file_and_download_command(tmp_path):
    path = tmp_path / "pulid_flux_v0.9.1.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        load_pulid_checkpoint(small_modules(), path)
    assert str(path) in str(err.value) and "run: pulid-flux download" in str(err.value)
    with pytest.raises(FileNotFoundError, match="pulid-flux download"):
        load_flux_transformer(tmp_path / "flux1-dev.safetensors", dtype=torch.float32)


# ----------------------------------------------------------------------------- FLUX transformer


def bfl_flux_shapes(width, head_dim, depth, single, in_ch=64, txt_dim=4096, vec_dim=768, mlp_ratio=4):
    """Key -> shape of a BFL-format FLUX transformer (flux1-dev.safetensors layout)."""
    mlp = width * mlp_ratio
    s = {"img_in.weight": (width, in_ch), "txt_in.weight": (width, txt_dim)}
    for name, fan_in in (("time_in", 256), ("vector_in", vec_dim), ("guidance_in", 256)):
        s[f"{name}.in_layer.weight"], s[f"{name}.out_layer.weight"] = (width, fan_in), (width, width)
    for i in range(depth):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            s[p + "mod.lin.weight"] = (6 * width, width)
            s[p + "attn.qkv.weight"] = (3 * width, width)
            s[p + "attn.norm.query_norm.scale"] = s[p + "attn.norm.key_norm.scale"] = (head_dim,)
            s[p + "attn.proj.weight"] = (width, width)
            s[p + "mlp.0.weight"], s[p + "mlp.2.weight"] = (mlp, width), (width, mlp)
    for i in range(single):
        p = f"single_blocks.{i}."
        s[p + "linear1.weight"], s[p + "linear2.weight"] = (3 * width + mlp, width), (width, width + mlp)
        s[p + "norm.query_norm.scale"] = s[p + "norm.key_norm.scale"] = (head_dim,)
        s[p + "modulation.lin.weight"] = (3 * width, width)
    s["final_layer.linear.weight"] = (in_ch, width)
    s["final_layer.adaLN_modulation.1.weight"] = (2 * width, width)
    for k in [k for k in s if k.endswith(".weight") and len(s[k]) == 2]:
        s[k[: -len("weight")] + "bias"] = (s[k][0],)
    return s


def test_bfl_conversion_small_width_loads_strict_and_splits_correctly():
    shapes = bfl_flux_shapes(width=64, head_dim=32, depth=2, single=3, txt_dim=24, vec_dim=12)
    g = torch.Generator().manual_seed(0)
    bfl = {"model.diffusion_model." + k: torch.randn(s, generator=g) for k, s in shapes.items()}
    converted, config = bfl_to_diffusers(bfl, axes_dims_rope=(8, 12, 12))
    assert config["num_attention_heads"] == 2 and config["attention_head_dim"] == 32
    assert (config["num_layers"], config["num_single_layers"]) == (2, 3)
    assert config["joint_attention_dim"] == 24 and config["pooled_projection_dim"] == 12
    model = FluxTransformer2DModel(**config)
    model.load_state_dict(converted, strict=True)
    lin1 = bfl["model.diffusion_model.single_blocks.2.linear1.weight"]
    assert torch.equal(converted["single_transformer_blocks.2.attn.to_k.weight"], lin1[64:128])
    assert torch.equal(converted["single_transformer_blocks.2.proj_mlp.weight"], lin1[192:])
    lin1_bias = bfl["model.diffusion_model.single_blocks.2.linear1.bias"]
    assert torch.equal(converted["single_transformer_blocks.2.proj_mlp.bias"], lin1_bias[192:])
    shift, scale = bfl["model.diffusion_model.final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(converted["norm_out.linear.weight"], torch.cat([scale, shift]))


def test_bfl_conversion_at_flux_dev_size_on_meta():
    shapes = bfl_flux_shapes(width=3072, head_dim=128, depth=19, single=38)
    with torch.device("meta"):
        bfl = {k: torch.empty(s) for k, s in shapes.items()}
        converted, config = bfl_to_diffusers(bfl)
        reference = FluxTransformer2DModel(guidance_embeds=True)
    assert config["num_attention_heads"] == 24 and config["guidance_embeds"]
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_bfl_conversion_rejects_unknown_keys():
    shapes = bfl_flux_shapes(width=64, head_dim=32, depth=1, single=1, txt_dim=8, vec_dim=8)
    with torch.device("meta"):
        bfl = {k: torch.empty(s) for k, s in shapes.items()} | {"double_blocks.0.extra.weight": torch.empty(2)}
        with pytest.raises(ValueError, match="double_blocks.0.extra.weight"):
            bfl_to_diffusers(bfl, axes_dims_rope=(8, 12, 12))


def test_load_flux_transformer_from_single_file_and_folder(tmp_path):
    shapes = bfl_flux_shapes(width=64, head_dim=32, depth=1, single=2, in_ch=16, txt_dim=8, vec_dim=8)
    g = torch.Generator().manual_seed(1)
    save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(tmp_path / "flux.safetensors"))
    from_file = load_flux_transformer(tmp_path / "flux.safetensors", dtype=torch.bfloat16, axes_dims_rope=(8, 12, 12))
    assert from_file.dtype == torch.bfloat16 and from_file.config.num_single_layers == 2
    assert not any(p.is_meta for p in from_file.parameters())
    from_file.save_pretrained(tmp_path / "transformer")
    from_dir = load_flux_transformer(tmp_path / "transformer", dtype=torch.float32)
    assert from_dir.dtype == torch.float32
    torch.testing.assert_close(from_dir.x_embedder.weight, from_file.x_embedder.weight.float())


# ----------------------------------------------------------------------------- FLUX VAE


def bfl_ae_shapes(ch_mult=(1, 2), ch=32, z=16, num_res=2):
    """Key -> shape of a BFL ``ae.safetensors`` autoencoder."""
    s = {}

    def conv(name, cout, cin, k=3):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        s[f"{name}.weight"] = s[f"{name}.bias"] = (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(prefix, c):
        resblock(f"{prefix}.mid.block_1", c, c), resblock(f"{prefix}.mid.block_2", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{p}", c, c, 1)

    conv("encoder.conv_in", ch, 3)
    cin = ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res):
            resblock(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin)
    mid("encoder", cin)
    norm("encoder.norm_out", cin), conv("encoder.conv_out", 2 * z, cin)
    conv("decoder.conv_in", cin, z)
    mid("decoder", cin)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res + 1):
            resblock(f"decoder.up.{i}.block.{j}", cin, ch * ch_mult[i])
            cin = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin)
    norm("decoder.norm_out", cin), conv("decoder.conv_out", 3, cin)
    return s


def test_flux_vae_config_is_read_off_the_weights():
    with torch.device("meta"):
        bfl = {k: torch.empty(s) for k, s in bfl_ae_shapes(ch_mult=(1, 2, 4, 4), ch=128).items()}
        config = bfl_vae_config(bfl)
        full = AutoencoderKL(**config)
    # FLUX.1-dev's released autoencoder
    assert list(config["block_out_channels"]) == [128, 256, 512, 512] and config["layers_per_block"] == 2
    assert config["latent_channels"] == 16 and len(config["up_block_types"]) == 4
    assert config["scaling_factor"] == 0.3611 and config["shift_factor"] == 0.1159
    assert not config["use_quant_conv"] and not config["use_post_quant_conv"] and config["mid_block_add_attention"]
    converted, _ = bfl_vae_to_diffusers(bfl)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in full.state_dict().items()}


def test_bfl_vae_conversion_loads_and_decodes(tmp_path):
    g = torch.Generator().manual_seed(0)
    bfl = {k: torch.randn(s, generator=g) * 0.05 for k, s in bfl_ae_shapes().items()}
    save_file(bfl, str(tmp_path / "ae.safetensors"))
    vae = load_flux_vae(tmp_path / "ae.safetensors")  # two levels, width 32/64: read off the weights
    assert list(vae.config.block_out_channels) == [32, 64]
    state = vae.state_dict()
    assert torch.equal(state["decoder.up_blocks.0.resnets.2.conv1.weight"], bfl["decoder.up.1.block.2.conv1.weight"])
    q_conv = bfl["encoder.mid.attn_1.q.weight"]
    assert torch.equal(state["encoder.mid_block.attentions.0.to_q.weight"], q_conv[:, :, 0, 0])
    with torch.no_grad():
        image = vae.decode(torch.randn(1, 16, 4, 4)).sample
    assert image.shape == (1, 3, 8, 8) and torch.isfinite(image).all()


# ----------------------------------------------------------------------------- chosen by setting


def test_bfl_single_files_and_pulid_v090_chosen_by_setting_load(tmp_path, monkeypatch):
    """PULID_FLUX_FLUX_TRANSFORMER / _FLUX_AE / _PULID_VERSION, resolved as the flux-dev preset does
    (WeightPaths.from_env), pass the completeness check and load with the preset's loaders."""
    from pulid_flux.engine.download import WeightPaths

    weights, bfl = tmp_path / "weights", tmp_path / "bfl"
    bfl.mkdir()
    # BFL flux1-dev.safetensors layout at a small width, with FLUX.1-dev's head dim (the loader's default rope)
    shapes = bfl_flux_shapes(width=128, head_dim=128, depth=1, single=1, txt_dim=8, vec_dim=8)
    g = torch.Generator().manual_seed(2)
    save_file({"model.diffusion_model." + k: torch.randn(s, generator=g).to(torch.bfloat16)
               for k, s in shapes.items()}, str(bfl / "flux1-dev.safetensors"))
    save_file({k: torch.randn(s, generator=g) * 0.05 for k, s in bfl_ae_shapes().items()}, str(bfl / "ae.safetensors"))
    modules = small_modules()
    pulid_dir = weights / "pulid"
    pulid_dir.mkdir(parents=True)
    ckpt = random_checkpoint(pulid_key_manifest(modules))
    save_file(ckpt, str(pulid_dir / "pulid_flux_v0.9.0.safetensors"))
    # the rest of the diffusers folder that the single files do not replace
    flux_dir = weights / "flux-dev"
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json",
                 "tokenizer_2/tokenizer_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                 "text_encoder_2/config.json", "text_encoder_2/model.safetensors"):
        (flux_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (flux_dir / name).write_text("{}")

    monkeypatch.setenv("PULID_FLUX_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("PULID_FLUX_FLUX_TRANSFORMER", str(bfl / "flux1-dev.safetensors"))
    monkeypatch.setenv("PULID_FLUX_FLUX_AE", str(bfl / "ae.safetensors"))
    monkeypatch.setenv("PULID_FLUX_PULID_VERSION", "v0.9.0")
    paths = WeightPaths.from_env()
    paths.check(["flux", "pulid"])  # no diffusers transformer/ or vae/ needed
    assert paths.pulid_checkpoint == pulid_dir / "pulid_flux_v0.9.0.safetensors"

    transformer = load_flux_transformer(paths.flux_transformer, dtype=torch.float32)
    assert transformer.config.num_layers == 1 and transformer.config.attention_head_dim == 128
    assert not any(p.is_meta for p in transformer.parameters())
    vae = load_flux_vae(paths.flux_ae)  # its (small) size is read off the weights
    assert vae.config.latent_channels == 16 and list(vae.config.block_out_channels) == [32, 64]
    load_pulid_checkpoint(modules, paths.pulid_checkpoint)
    torch.testing.assert_close(modules.state_dict()["pulid_ca.0.to_q.weight"], ckpt["pulid_ca.0.to_q.weight"].float())
