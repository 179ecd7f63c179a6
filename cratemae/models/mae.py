"""Masked autoencoders with white-box CRATE blocks (CRATE-MAE) or ViT blocks (the MAE baselines).

One module covers the paper's model and its baselines:

* encoder_block='crate', decoder_block='crate', encoder_sees_mask_tokens=True: CRATE-MAE exactly as the reference
  (Ma-Lab-Berkeley/CRATE ``model/crate_ae``). Masked patches are replaced by a learned mask token *before* the
  encoder, the fixed sin-cos embedding is added once after masking (the class token's row is zero), and the decoder
  reads the encoder output directly: no decoder embedding, no second mask insertion, no second position embedding.
* encoder_sees_mask_tokens=False: the FAIR-MAE forward. The encoder sees the visible patches only (position
  embedding added before masking); ``decoder_embed``, a decoder mask token and the decoder position embedding come
  before the decoder.
* encoder_block / decoder_block = 'vit': pre-LN ViT blocks with a GELU MLP (the reference file's ``mae_vit_base``,
  FAIR's MAE-Base).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cratemae import ops
from cratemae.models import layers


class MaskedAutoencoder(nn.Module):
    """CRATE-MAE and its MAE baselines. Fields mirror ``config.model`` (see ``cratemae.models.default_model_config``)."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    encoder_block: str = 'crate'  # or 'vit'
    decoder_block: str = 'crate'  # or 'vit'
    width: int = 768
    depth: int = 12
    heads: int = 12
    decoder_width: int = 768
    decoder_depth: int = 12
    decoder_heads: int = 12
    mlp_ratio: float = 4.0  # vit blocks only
    qkv_bias: bool = False  # vit blocks only
    ista_step: float = 0.1  # eta
    ista_lambda: float = 0.5  # lambda (the reference's first release used 5.0)
    fused_ista: bool = False
    encoder_sees_mask_tokens: bool = True
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    block_norm_eps: float = 1e-5
    final_norm_eps: float = 1e-6
    attention: str = 'einsum'  # or 'dot_product_attention', 'cudnn' (GPU, bf16): see ops.subspace_attention
    attention_pad: int = 0  # dot_product_attention/cudnn: pad tokens to a multiple of this inside attention, 0 = none
    attention_operator: str = 'mssa'  # CRATE blocks' compression: 'mssa' or 'tssa' (ToST), both sides
    sparse_block: str = 'ista'  # CRATE blocks' sparse step: 'ista' or 'crate_alpha' (overcomplete), both sides
    sparse_expansion: int = 4  # crate_alpha: dictionary d x (sparse_expansion * d)
    sparse_steps: int = 2  # crate_alpha: unrolled ISTA steps from a zero code
    remat: str = 'none'  # 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable'
    scan_unroll: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def grid_size(self):
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size**2

    def _stack(self, role, block, depth, heads, name):
        kwargs = dict(
            heads=heads,
            norm_eps=self.block_norm_eps,
            ista_step=self.ista_step,
            ista_lambda=self.ista_lambda,
            fused_ista=self.fused_ista,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            attention=self.attention,
            attention_pad=self.attention_pad,
            attention_operator=self.attention_operator,
            sparse_block=self.sparse_block,
            sparse_expansion=self.sparse_expansion,
            sparse_steps=self.sparse_steps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        return layers.Stack(block, role, depth, tuple(sorted(kwargs.items())), self.remat, self.scan_unroll, name=name)

    def _norm(self, name):
        return nn.LayerNorm(
            epsilon=self.final_norm_eps,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def setup(self):
        p, c, d = self.patch_size, self.channels, self.width
        self.patch_embed = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding='VALID',
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=layers.patch_kernel_init,
            bias_init=layers.conv_bias_init(p * p * c),
        )
        self.cls_token = self.param('cls_token', layers.token_init, (1, 1, d), self.param_dtype)
        mask_width = d if self.encoder_sees_mask_tokens else self.decoder_width
        self.mask_token = self.param('mask_token', layers.token_init, (1, 1, mask_width), self.param_dtype)
        self.encoder = self._stack('encoder', self.encoder_block, self.depth, self.heads, 'encoder')
        self.encoder_norm = self._norm('encoder_norm')
        if not self.encoder_sees_mask_tokens:
            self.decoder_embed = nn.Dense(
                self.decoder_width, kernel_init=layers.xavier, dtype=self.dtype, param_dtype=self.param_dtype
            )
        self.decoder = self._stack('decoder', self.decoder_block, self.decoder_depth, self.decoder_heads, 'decoder')
        self.decoder_norm = self._norm('decoder_norm')
        self.decoder_pred = nn.Dense(
            p * p * c, kernel_init=layers.xavier, dtype=self.dtype, param_dtype=self.param_dtype
        )

    # --------------------------------------------------------------------------------------------------------------

    def check_images(self, images):
        """Raises ValueError, before any tracing of the layers, for images the model cannot take."""
        expected = (self.image_size, self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f'images must have shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) (NHWC), '
                f'got {tuple(images.shape)}.'
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                f'images must be floating point (normalised pixels), got dtype {images.dtype}; convert '
                'uint8 images with the data pipeline or images.astype(np.float32) after normalising.'
            )

    def _embed_patches(self, images):
        """Patch embedding e (B, L, d) of a stride-p, p x p convolution."""
        e = self.patch_embed(images.astype(self.dtype))
        return e.reshape(e.shape[0], -1, self.width)

    def _with_cls(self, tokens):
        cls = jnp.broadcast_to(self.cls_token.astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
        return jnp.concatenate([cls, tokens], axis=1)

    def embed(self, images):
        """The encoder's input without masking: Z^0 = [c; e_1..e_L] + P, shape (B, N, d)."""
        self.check_images(images)
        pos = ops.sincos_pos_embed(self.width, self.grid_size)
        return self._with_cls(self._embed_patches(images)) + pos.astype(self.dtype)

    def encode(self, images):
        """Features without masking: LN_enc(encoder(Z^0)), shape (B, N, d). For probes and diagnostics."""
        return self.encoder_norm(self.encoder(self.embed(images)))

    def _masked_encoder_tokens(self, e, mask, ids_keep):
        """The encoder's input sequence after masking (docs/model.md §2.4 for the reference; FAIR's visible-only otherwise)."""
        pos = ops.sincos_pos_embed(self.width, self.grid_size).astype(self.dtype)
        if self.encoder_sees_mask_tokens:
            e = jnp.where(mask[..., None] > 0, self.mask_token.astype(e.dtype), e)
            return self._with_cls(e) + pos
        e = e + pos[1:]
        visible = jnp.take_along_axis(e, ids_keep[..., None], axis=1)
        return self._with_cls(visible)  # the class token's position row is zero

    def _decoder_tokens(self, latent, ids_restore):
        """Decoder input: the latent itself (reference), or embed + mask tokens + position (FAIR)."""
        if self.encoder_sees_mask_tokens:
            return latent
        x = self.decoder_embed(latent)
        b, num_patches = ids_restore.shape
        masks = jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, num_patches + 1 - x.shape[1], x.shape[-1]))
        shuffled = jnp.concatenate([x[:, 1:], masks], axis=1)
        patches = jnp.take_along_axis(shuffled, ids_restore[..., None], axis=1)
        pos = ops.sincos_pos_embed(self.decoder_width, self.grid_size).astype(x.dtype)
        return jnp.concatenate([x[:, :1], patches], axis=1) + pos

    def __call__(self, images, *, noise=None, mask_ratio=None, train=True):
        """Masked completion of NHWC images.

        Args:
          images: (B, H, W, C) floats.
          noise: optional (B, L) floats; the int(L(1-r)) patches with the smallest noise stay visible. Drawn from the
            'masking' RNG stream when omitted.
          mask_ratio: overrides the configured ratio r.
          train: unused (no dropout in CRATE-MAE); kept for a uniform module API.
        Returns:
          dict with loss (scalar), pred (B, L, p*p*C) in the target's (u, v, c) order, mask (B, L; 1 = masked),
          latent (B, N, d) after the final encoder norm.
        """
        del train
        self.check_images(images)
        ratio = self.mask_ratio if mask_ratio is None else float(mask_ratio)
        check_mask_ratio(ratio, self.num_patches)
        if noise is None:
            noise = jax.random.uniform(self.make_rng('masking'), (images.shape[0], self.num_patches))
        elif tuple(noise.shape) != (images.shape[0], self.num_patches):
            raise ValueError(
                f'noise must have shape (batch, num_patches) = ({images.shape[0]}, {self.num_patches}), '
                f'got {tuple(noise.shape)}.'
            )
        ids_keep, ids_restore, mask = ops.random_masking(noise, ratio)
        z = self._masked_encoder_tokens(self._embed_patches(images), mask, ids_keep)
        latent = self.encoder_norm(self.encoder(z))
        y = self.decoder_norm(self.decoder(self._decoder_tokens(latent, ids_restore)))
        pred = self.decoder_pred(y)[:, 1:].astype(jnp.float32)
        target = ops.patchify(images, self.patch_size)
        loss = ops.masked_reconstruction_loss(pred, target, mask, self.norm_pix_loss)
        return {'loss': loss, 'pred': pred, 'mask': mask, 'latent': latent}


def check_mask_ratio(ratio, num_patches):
    """Rejects a mask ratio outside (0, 1) or one that keeps no patch, naming the value."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f'mask_ratio must be in (0, 1), got {ratio} (0 masks nothing and leaves the loss 0/0).')
    if ops.num_kept(num_patches, ratio) < 1:
        raise ValueError(
            f'mask_ratio={ratio} keeps int({num_patches} * (1 - {ratio})) = 0 of {num_patches} patches; '
            'lower it so at least one patch stays visible.'
        )
